"""Reward section: the limits of math-verify scoring (reward/math.py, `MathScorer`) and DAPO's
overlong reward shaping (reward/overlong.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import check


@dataclass(kw_only=True, slots=True)
class OverlongConfig:
    """DAPO's overlong reward shaping of responses near or at the length limit (docs/training.md).

    `buffer_tokens` > 0: a response of L tokens gets min(0, -(L - (max_response_tokens -
    buffer_tokens)) / buffer_tokens * penalty_factor) added to its reward, a penalty growing
    linearly from 0 at the buffer's start to -penalty_factor at the limit (verl's
    `reward_model.overlong_buffer.len` / `.penalty_factor`). `mask_truncated`: responses that
    hit the limit (finish reason `length`) are left out of the loss (DAPO's overlong filtering);
    they still count in their group's reward statistics.
    """

    buffer_tokens: int = 0  # 0: no soft penalty
    penalty_factor: float = 1.0
    max_response_tokens: int = 0  # 0: rollout.learner.sampling.max_new_tokens (verl's data.max_response_length)
    mask_truncated: bool = False

    def __post_init__(self) -> None:
        check(self.buffer_tokens >= 0, f"reward.overlong.buffer_tokens must be >= 0 (0: no penalty), "
              f"got {self.buffer_tokens}")
        check(self.penalty_factor >= 0, f"reward.overlong.penalty_factor must be >= 0, got {self.penalty_factor}")
        check(self.max_response_tokens >= 0, "reward.overlong.max_response_tokens must be >= 0 (0: the learner's "
              f"rollout.learner.sampling.max_new_tokens), got {self.max_response_tokens}")

    @property
    def enabled(self) -> bool:
        return self.buffer_tokens > 0 or self.mask_truncated


@dataclass(kw_only=True, slots=True)
class RewardConfig:
    # Wall-clock limit per completion: past it the scoring process is killed and replaced, and
    # the completion gets 0.0 (a pathological answer such as 9^{9^{9^{9}}} never returns).
    timeout_s: float = 5.0
    # Wall-clock limit per scored batch (a step submits a few): completions not scored by then
    # get 0.0, so a batch of degenerate completions costs at most this. null: no limit.
    batch_timeout_s: float | None = 300.0
    overlong: OverlongConfig = field(default_factory=OverlongConfig)

    def __post_init__(self) -> None:
        check(self.timeout_s > 0, f"reward.timeout_s must be > 0 seconds, got {self.timeout_s}")
        check(self.batch_timeout_s is None or self.batch_timeout_s > 0,
              f"reward.batch_timeout_s must be > 0 seconds or null, got {self.batch_timeout_s}")

    def scorer_kwargs(self) -> dict:
        """Keyword arguments of MathScorer for these limits."""
        return {"timeout_s": self.timeout_s, "batch_timeout_s": self.batch_timeout_s}
