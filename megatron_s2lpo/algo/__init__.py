"""Algorithm core: pure tensor math, no torch.distributed and no megatron.

schedule    explorer share alpha_i and the (explorer, learner) split of every group (S2L-PO)
advantages  group-relative GRPO advantages over the combined group
pods        PODS down-sampling selectors (max variance, max reward, random)
group_filter  DAPO dynamic sampling's filter: which groups' rewards vary
passk       pass@k / avg@k evaluation metrics
losses      PPO-clip policy loss (clip-higher, dual clip, truncated IS, KL, entropy)
distill     forward-KL warmup and on-policy distillation (dense advantages or a direct loss)
"""

from megatron_s2lpo.algo.advantages import group_advantages
from megatron_s2lpo.algo.distill import OPD_MODES, forward_kl_loss, opd_token_advantages, reverse_kl_loss
from megatron_s2lpo.algo.losses import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    PolicyLossConfig,
    kl_penalty,
    loss_normalizer,
    policy_loss,
    truncated_importance_weights,
)
from megatron_s2lpo.algo.group_filter import FILTER_METRICS, filter_values, informative_groups
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
    TEMPERATURE_SCHEDULES,
    explorer_share,
    sampling_temperature,
    schedule_share,
    split_group,
)

__all__ = [
    "AGGREGATIONS",
    "FILTER_METRICS",
    "KL_ESTIMATORS",
    "OPD_MODES",
    "ROUNDINGS",
    "SCHEDULES",
    "TEMPERATURE_SCHEDULES",
    "SELECTORS",
    "PolicyLossConfig",
    "avg_at_k_pass1",
    "explorer_share",
    "filter_values",
    "forward_kl_loss",
    "group_advantages",
    "informative_groups",
    "kl_penalty",
    "loss_normalizer",
    "max_reward_indices",
    "max_variance_indices",
    "opd_token_advantages",
    "pass_at_k",
    "pass_at_k_curve",
    "policy_loss",
    "random_indices",
    "reverse_kl_loss",
    "sampling_temperature",
    "schedule_share",
    "select",
    "split_group",
    "truncated_importance_weights",
]
