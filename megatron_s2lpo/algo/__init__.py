"""Algorithm core: pure tensor math, no torch.distributed and no megatron.

schedule    explorer share alpha_i and the (explorer, learner) split of every group (S2L-PO)
advantages  group-relative GRPO advantages over the combined group
pods        PODS down-sampling selectors (max variance, max reward, random)
passk       pass@k / avg@k evaluation metrics
losses      PPO-clip policy loss (clip-higher, dual clip, truncated IS, KL, entropy)
"""

from megatron_s2lpo.algo.advantages import group_advantages
from megatron_s2lpo.algo.losses import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    PolicyLossConfig,
    kl_penalty,
    loss_normalizer,
    policy_loss,
    truncated_importance_weights,
)
from megatron_s2lpo.algo.passk import avg_at_k_pass1, pass_at_k, pass_at_k_curve
from megatron_s2lpo.algo.pods import (
    SELECTORS,
    max_reward_indices,
    max_variance_indices,
    random_indices,
    select,
)
from megatron_s2lpo.algo.schedule import (
    ROUNDINGS,
    SCHEDULES,
    explorer_share,
    schedule_share,
    split_group,
)

__all__ = [
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "ROUNDINGS",
    "SCHEDULES",
    "SELECTORS",
    "PolicyLossConfig",
    "avg_at_k_pass1",
    "explorer_share",
    "group_advantages",
    "kl_penalty",
    "loss_normalizer",
    "max_reward_indices",
    "max_variance_indices",
    "pass_at_k",
    "pass_at_k_curve",
    "policy_loss",
    "random_indices",
    "schedule_share",
    "select",
    "split_group",
    "truncated_importance_weights",
]
