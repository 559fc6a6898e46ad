"""DAPO's overlong reward shaping: a soft penalty over a buffer before the length limit, and the
option to leave truncated responses out of the loss (reward.overlong, docs/training.md).

The penalty is verl's (verl/workers/reward_manager/dapo.py, `DAPORewardManager.__call__`):

    expected_len = max_resp_len - overlong_buffer_len
    exceed_len = valid_response_length - expected_len
    overlong_reward = min(-exceed_len / overlong_buffer_len * overlong_penalty_factor, 0)
    reward += overlong_reward

where `valid_response_length` is the number of response tokens the engine returned (its stop
token included), as `Rollout.response_ids` holds them. verl computes it on a float32 tensor,
here in float64 (tests/contract/test_verl_dapo.py runs both on the same lengths).
"""

from __future__ import annotations

from collections.abc import Iterable

from ..config.reward import OverlongConfig
from ..types import FinishReason, Rollout


def overlong_penalty(num_tokens: int, *, max_tokens: int, buffer_tokens: int, penalty_factor: float) -> float:
    """The reward added to a response of `num_tokens` tokens: 0 up to max_tokens - buffer_tokens,
    then falling linearly to -penalty_factor at max_tokens (0 when buffer_tokens is 0).

    >>> [overlong_penalty(n, max_tokens=20, buffer_tokens=4, penalty_factor=1.0) for n in (10, 16, 18, 20)]
    [0.0, 0.0, -0.5, -1.0]
    """
    if buffer_tokens <= 0:
        return 0.0
    exceed = num_tokens - (max_tokens - buffer_tokens)
    return min(-exceed / buffer_tokens * penalty_factor, 0.0)


class OverlongShaping:
    """Applies reward.overlong to scored rollouts, in place; counts what it did."""

    def __init__(self, config: OverlongConfig, max_tokens: int) -> None:
        if config.buffer_tokens > max_tokens:
            raise ValueError(f"reward.overlong.buffer_tokens={config.buffer_tokens} exceeds the response limit "
                             f"{max_tokens}")
        self.config = config
        self.max_tokens = max_tokens

    def penalty(self, rollout: Rollout) -> float:
        c = self.config
        return overlong_penalty(len(rollout.response_ids), max_tokens=self.max_tokens,
                                buffer_tokens=c.buffer_tokens, penalty_factor=c.penalty_factor)

    def apply(self, rollouts: Iterable[Rollout]) -> dict[str, float]:
        """Add the penalty to each reward (set), mask truncated responses if asked; returns counts
        over these rollouts: overlong/num_samples, num_truncated, num_penalized, penalty_sum."""
        counts = dict.fromkeys(("num_samples", "num_truncated", "num_penalized", "penalty_sum"), 0.0)
        for r in rollouts:
            if r.reward is None:
                raise ValueError(f"rollout {r.prompt_id}/{r.sample_index} has no reward to shape")
            penalty = self.penalty(r)
            r.reward += penalty
            truncated = r.finish_reason is FinishReason.LENGTH
            if truncated and self.config.mask_truncated:
                r.loss_mask = [0] * len(r.response_ids)
            counts["num_samples"] += 1
            counts["num_truncated"] += truncated
            counts["num_penalized"] += penalty < 0
            counts["penalty_sum"] += penalty
        return {f"overlong/{k}": v for k, v in counts.items()}


def overlong_metrics(counts: dict[str, float]) -> dict[str, float]:
    """overlong/truncated_frac, penalized_frac, penalty_mean from summed `apply` counts."""
    n = counts.get("overlong/num_samples", 0.0)
    if not n:
        return {}
    return {"overlong/truncated_frac": counts["overlong/num_truncated"] / n,
            "overlong/penalized_frac": counts["overlong/num_penalized"] / n,
            "overlong/penalty_mean": counts["overlong/penalty_sum"] / n}
