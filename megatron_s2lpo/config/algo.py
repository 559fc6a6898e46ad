"""Algorithm section: S2L-PO schedule, GRPO advantages and loss, PODS.

Names of schedules, aggregations, KL estimators and selectors are listed here as plain tuples so
that the config layer does not import the algorithm code; a unit test keeps them equal to the
registries in `megatron_s2lpo.algo`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import check

SCHEDULE_NAMES = ("constant", "cosine", "linear", "step")
ROUNDING_MODES = ("paper", "released")
LOSS_AGGREGATIONS = ("seq-mean-token-mean", "seq-mean-token-sum", "token-mean")
KL_TYPES = ("k1", "k2", "low_var_kl")
PODS_SELECTORS = ("max_reward", "max_variance", "random")
OLD_LOGPROB_MODES = ("behaviour", "recompute")


@dataclass(kw_only=True, slots=True)
class PodsConfig:
    """PODS down-sampling: generate `n` rollouts per prompt, train on `m` of them (0 = off)."""

    n: int = 0
    m: int = 0
    selector: str = "max_variance"

    def __post_init__(self) -> None:
        check(self.selector in PODS_SELECTORS,
              f"algo.pods.selector must be one of {PODS_SELECTORS}, got {self.selector!r}")
        check((self.n == 0) == (self.m == 0),
              f"algo.pods.n and algo.pods.m must both be 0 (off) or both set, got n={self.n} m={self.m}")
        check(0 <= self.m <= self.n, f"algo.pods.m must be in 1..n, got n={self.n} m={self.m}")

    @property
    def enabled(self) -> bool:
        return self.n > 0


@dataclass(kw_only=True, slots=True)
class AlgoConfig:
    group_size: int = 16  # G: rollouts per prompt (PODS: the m that are trained on)
    t_mix: int = 0  # steps with an explorer share; 0 = plain GRPO
    schedule: str = "linear"
    constant_share: float = 0.5  # the share of the `constant` schedule
    rounding: str = "paper"
    normalize_std: bool = True
    adv_eps: float = 1e-6
    loss_agg_mode: str = "token-mean"
    clip_low: float = 0.2
    clip_high: float = 0.2  # DAPO clip-higher uses 0.28
    clip_ratio_c: float | None = 3.0  # dual-clip cap for negative advantages; null turns it off
    kl_coef: float = 0.0
    kl_estimator: str = "low_var_kl"
    entropy_coef: float = 0.0
    old_logprob: str = "recompute"  # recompute with the learner (paper) or the behaviour log-probs
    is_threshold: float = 2.0  # truncation of importance weights in `behaviour` mode
    ppo_epochs: int = 1
    mini_batches_per_step: int = 1
    pods: PodsConfig = field(default_factory=PodsConfig)

    def __post_init__(self) -> None:
        check(self.group_size >= 1, f"algo.group_size must be >= 1, got {self.group_size}")
        check(self.t_mix >= 0, f"algo.t_mix must be >= 0 (0 disables the explorer), got {self.t_mix}")
        check(self.schedule in SCHEDULE_NAMES,
              f"algo.schedule must be one of {SCHEDULE_NAMES}, got {self.schedule!r}")
        check(0 <= self.constant_share <= 1,
              f"algo.constant_share must be in [0, 1], got {self.constant_share}")
        check(self.rounding in ROUNDING_MODES,
              f"algo.rounding must be one of {ROUNDING_MODES}, got {self.rounding!r}")
        check(self.adv_eps >= 0, f"algo.adv_eps must be >= 0, got {self.adv_eps}")
        check(self.loss_agg_mode in LOSS_AGGREGATIONS,
              f"algo.loss_agg_mode must be one of {LOSS_AGGREGATIONS}, got {self.loss_agg_mode!r}")
        check(0 <= self.clip_low < 1, f"algo.clip_low must be in [0, 1), got {self.clip_low}")
        check(self.clip_high >= 0, f"algo.clip_high must be >= 0, got {self.clip_high}")
        check(self.kl_coef >= 0, f"algo.kl_coef must be >= 0, got {self.kl_coef}")
        check(self.clip_ratio_c is None or self.clip_ratio_c > 1,
              f"algo.clip_ratio_c must be > 1 or null (off), got {self.clip_ratio_c}")
        check(self.kl_estimator in KL_TYPES,
              f"algo.kl_estimator must be one of {KL_TYPES}, got {self.kl_estimator!r}")
        check(self.old_logprob in OLD_LOGPROB_MODES,
              f"algo.old_logprob must be one of {OLD_LOGPROB_MODES}, got {self.old_logprob!r}")
        check(self.is_threshold > 0, f"algo.is_threshold must be > 0, got {self.is_threshold}")
        check(self.ppo_epochs >= 1, f"algo.ppo_epochs must be >= 1, got {self.ppo_epochs}")
        check(self.mini_batches_per_step >= 1,
              f"algo.mini_batches_per_step must be >= 1, got {self.mini_batches_per_step}")
        if self.pods.enabled:
            check(self.pods.m == self.group_size,
                  f"algo.pods.m ({self.pods.m}) must equal algo.group_size ({self.group_size}): "
                  "the group that advantages are computed over is the m kept rollouts")

    @property
    def num_generated_per_prompt(self) -> int:
        """Rollouts generated per prompt: PODS's n when enabled, else the group size."""
        return self.pods.n if self.pods.enabled else self.group_size
