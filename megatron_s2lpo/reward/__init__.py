"""Verifiable rewards: plain functions `(completion, ground_truth) -> float`, chosen by name.

    reward_fn = get_reward_function(config.reward.name)   # "math", "choice" or "boxed_format"
    reward = reward_fn(completion, ground_truth)

For batches of math answers use `MathScorer` (worker processes, hard timeout, async submit).
"""

from __future__ import annotations

from collections.abc import Callable

from megatron_s2lpo.reward.format import (
    boxed_format_reward,
    choice_reward,
    count_boxes,
    extract_choice,
    extract_last_boxed,
)
from megatron_s2lpo.reward.math import MathScorer, ScorerClosedError, ScorerStats, math_reward

RewardFn = Callable[[str, str], float]

REWARD_FUNCTIONS: dict[str, RewardFn] = {
    "math": math_reward,
    "choice": choice_reward,
    "boxed_format": boxed_format_reward,
}


def get_reward_function(name: str) -> RewardFn:
    """The reward function registered as `name`; ValueError listing the valid names otherwise.

    >>> get_reward_function("choice")("the answer is (B)", "B")
    1.0
    """
    try:
        return REWARD_FUNCTIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown reward {name!r}; valid names: {', '.join(sorted(REWARD_FUNCTIONS))}"
        ) from None


__all__ = [
    "REWARD_FUNCTIONS",
    "MathScorer",
    "RewardFn",
    "ScorerClosedError",
    "ScorerStats",
    "boxed_format_reward",
    "choice_reward",
    "count_boxes",
    "extract_choice",
    "extract_last_boxed",
    "get_reward_function",
    "math_reward",
]
