"""Algorithm section: the training method, S2L-PO schedule, GRPO advantages and loss, PODS,
distillation and the learner's sampling-temperature schedule.

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
# grpo: verifiable-reward RL (S2L-PO when algo.t_mix > 0); forward_kl: cross-entropy on the
# teacher's completions; opd: on-policy distillation against the teacher's per-token log-probs.
METHODS = ("grpo", "forward_kl", "opd")
OPD_MODES = ("advantage", "loss")
TEMPERATURE_SCHEDULES = ("constant", "linear")
# what dynamic sampling compares within a group: the reward the advantages use, the verifier's
# score before reward shaping, or its accuracy (score >= 1)
FILTER_METRICS = ("accuracy", "reward", "score")


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
class DynamicSamplingConfig:
    """DAPO's dynamic sampling: train only on groups whose `metric` varies, over-sampling prompts.

    Each round draws `oversample` sampler batches of data.prompts_per_step prompts, collects and
    scores their groups (explorer and learner samples together) and keeps the groups whose
    `metric` is not the same for every sample; rounds go on until data.prompts_per_step groups
    are kept or `max_rounds` rounds ran (then the step trains on the groups it has; with none,
    on its first round's groups). docs/training.md, "Dynamic sampling".
    """

    enabled: bool = False
    metric: str = "accuracy"  # verl's algorithm.filter_groups.metric=acc (the DAPO recipe)
    max_rounds: int = 10  # verl's algorithm.filter_groups.max_num_gen_batches (the DAPO recipe)
    oversample: int = 1  # sampler batches per round (verl's data.gen_batch_size / data.train_batch_size)

    def __post_init__(self) -> None:
        check(self.metric in FILTER_METRICS,
              f"algo.dynamic_sampling.metric must be one of {FILTER_METRICS}, got {self.metric!r}")
        check(self.max_rounds >= 1, f"algo.dynamic_sampling.max_rounds must be >= 1, got {self.max_rounds}")
        check(self.oversample >= 1, f"algo.dynamic_sampling.oversample must be >= 1, got {self.oversample}")


@dataclass(kw_only=True, slots=True)
class DistillConfig:
    """Teacher supervision of the `forward_kl` and `opd` methods (the teacher is rollout.teacher).

    forward_kl: the student's loss is the cross-entropy of the teacher's completions; with
    `top_k` > 0 against the teacher's top-k distribution at every position (renormalised over
    the k), scored by the teacher. opd: the teacher scores every student token; `opd_mode`
    `advantage` turns coef * (log p_teacher - log p_student) into per-token advantages for the
    PPO-clip loss (plus `reward_weight` x the GRPO sequence advantage); `loss` minimises the
    per-token reverse KL directly (docs/training.md, "Distillation").
    """

    top_k: int = 0
    opd_mode: str = "advantage"
    opd_coef: float = 1.0
    opd_clip: float | None = None  # |per-token OPD advantage| cap; null: no cap
    reward_weight: float = 0.0  # opd advantage mode: weight of the sparse GRPO advantage added
    score_batch_size: int = 256  # sequences per teacher scoring call

    def __post_init__(self) -> None:
        check(self.top_k >= 0, f"algo.distill.top_k must be >= 0 (0: the sampled tokens only), got {self.top_k}")
        check(self.opd_mode in OPD_MODES, f"algo.distill.opd_mode must be one of {OPD_MODES}, got {self.opd_mode!r}")
        check(self.opd_coef > 0, f"algo.distill.opd_coef must be > 0, got {self.opd_coef}")
        check(self.opd_clip is None or self.opd_clip > 0,
              f"algo.distill.opd_clip must be > 0 or null (no cap), got {self.opd_clip}")
        check(self.reward_weight >= 0, f"algo.distill.reward_weight must be >= 0, got {self.reward_weight}")
        check(self.score_batch_size >= 1, f"algo.distill.score_batch_size must be >= 1, got {self.score_batch_size}")


@dataclass(kw_only=True, slots=True)
class TemperatureScheduleConfig:
    """Sampling temperature of the learner's own rollouts per step (the token-level baseline).

    constant: rollout.learner.sampling.temperature at every step. linear: from that
    temperature at step 1 to `end` at step 1 + `steps`, then `end`. The learner's old and new
    log-probs use the same per-step temperature; evaluation uses run.eval_temperature.
    """

    schedule: str = "constant"
    end: float = 1.0
    steps: int = 0

    def __post_init__(self) -> None:
        check(self.schedule in TEMPERATURE_SCHEDULES,
              f"algo.temperature.schedule must be one of {TEMPERATURE_SCHEDULES}, got {self.schedule!r}")
        check(self.end > 0, f"algo.temperature.end must be > 0, got {self.end}")
        check(self.steps >= 0, f"algo.temperature.steps must be >= 0, got {self.steps}")
        check(self.schedule != "linear" or self.steps >= 1,
              "algo.temperature.schedule=linear needs algo.temperature.steps >= 1 (the anneal length)")


@dataclass(kw_only=True, slots=True)
class AlgoConfig:
    method: str = "grpo"
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
    # truncation of importance weights (behaviour mode, precision correction, run.max_staleness=1);
    # null: no importance weights
    is_threshold: float | None = 2.0
    # recompute mode: truncated IS weights min(exp(old - behaviour), is_threshold) on the learner's
    # own samples, for the numerics gap between the learner and its rollout engine (e.g. an FP8
    # learner, bf16 SGLang); null: on when learner.precision differs from the engine's
    precision_correction: bool | None = None
    ppo_epochs: int = 1
    mini_batches_per_step: int = 1
    pods: PodsConfig = field(default_factory=PodsConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    temperature: TemperatureScheduleConfig = field(default_factory=TemperatureScheduleConfig)
    dynamic_sampling: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)

    def __post_init__(self) -> None:
        check(self.method in METHODS, f"algo.method must be one of {METHODS}, got {self.method!r}")
        check(self.method == "grpo" or self.t_mix == 0,
              f"algo.method={self.method} takes no explorer share (algo.t_mix={self.t_mix}); set "
              "algo.t_mix=0, or algo.method=grpo for S2L-PO")
        policy_loss = self.method == "grpo" or (self.method == "opd" and self.distill.opd_mode == "advantage")
        check(policy_loss or (self.kl_coef == 0 and self.entropy_coef == 0),
              f"algo.kl_coef / algo.entropy_coef belong to the PPO-clip loss, which algo.method={self.method}"
              + ("" if self.method == "forward_kl" else " with distill.opd_mode=loss") + " does not use; set them to 0")
        check(self.method != "forward_kl" or not self.pods.enabled,
              "algo.pods selects by reward variance, which forward_kl does not train on; turn PODS off")
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
        check(self.is_threshold is None or self.is_threshold > 0,
              f"algo.is_threshold must be > 0 or null (no importance weights), got {self.is_threshold}")
        check(self.ppo_epochs >= 1, f"algo.ppo_epochs must be >= 1, got {self.ppo_epochs}")
        check(self.mini_batches_per_step >= 1,
              f"algo.mini_batches_per_step must be >= 1, got {self.mini_batches_per_step}")
        check(self.method == "grpo" or not self.dynamic_sampling.enabled,
              f"algo.dynamic_sampling filters groups by reward, which algo.method={self.method} does not train "
              "on; set algo.dynamic_sampling.enabled=false")
        check(not self.dynamic_sampling.enabled or self.num_generated_per_prompt >= 2,
              "algo.dynamic_sampling compares the samples of a group: it needs algo.group_size (algo.pods.n "
              f"with PODS) >= 2, got {self.num_generated_per_prompt}")
        if self.pods.enabled:
            check(self.pods.m == self.group_size,
                  f"algo.pods.m ({self.pods.m}) must equal algo.group_size ({self.group_size}): "
                  "the group that advantages are computed over is the m kept rollouts")

    @property
    def num_generated_per_prompt(self) -> int:
        """Rollouts generated per prompt: PODS's n when enabled, else the group size."""
        return self.pods.n if self.pods.enabled else self.group_size
