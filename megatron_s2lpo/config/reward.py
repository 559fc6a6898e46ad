"""Reward section: the limits of math-verify scoring (reward/math.py, `MathScorer`)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import check


@dataclass(kw_only=True, slots=True)
class RewardConfig:
    # Wall-clock limit per completion: past it the scoring process is killed and replaced, and
    # the completion gets 0.0 (a pathological answer such as 9^{9^{9^{9}}} never returns).
    timeout_s: float = 5.0
    # Wall-clock limit per scored batch (a step submits a few): completions not scored by then
    # get 0.0, so a batch of degenerate completions costs at most this. null: no limit.
    batch_timeout_s: float | None = 300.0

    def __post_init__(self) -> None:
        check(self.timeout_s > 0, f"reward.timeout_s must be > 0 seconds, got {self.timeout_s}")
        check(self.batch_timeout_s is None or self.batch_timeout_s > 0,
              f"reward.batch_timeout_s must be > 0 seconds or null, got {self.batch_timeout_s}")

    def scorer_kwargs(self) -> dict:
        """Keyword arguments of MathScorer for these limits."""
        return {"timeout_s": self.timeout_s, "batch_timeout_s": self.batch_timeout_s}
