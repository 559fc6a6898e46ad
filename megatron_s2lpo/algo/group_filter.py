"""Which groups carry a learning signal: the filter of DAPO's dynamic sampling.

A group whose rewards are all equal has zero advantage for every sample (`advantages.
group_advantages`), so it only dilutes the batch. Dynamic sampling keeps a group when its filter
metric is not the same for every sample of the group, over BOTH sources in S2L-PO: an explorer
success in a group the learner fails entirely makes the group informative. Metrics (`FILTER_METRICS`):

    reward    the reward the advantages are computed from (after reward shaping such as the
              overlong penalty; verl's `seq_final_reward`)
    score     the verifier's reward before shaping (verl's `seq_reward` / `score`)
    accuracy  score >= 1: solved or not (verl's `acc`, the DAPO recipe's choice)

verl (recipe/dapo/dapo_ray_trainer.py) keeps a group when `np.std(values) > 0`. That agrees with
`max != min` except where a group's equal values do not average back to themselves in floating
point (e.g. three rewards of 0.7: np.std is 1e-16), which verl keeps and we drop: their
advantages are exactly zero here (tests/contract/test_verl_dapo.py shows both).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from megatron_s2lpo.algo.advantages import _check_rewards

FilterMetric = Callable[[Tensor, Tensor], Tensor]

FILTER_METRICS: dict[str, FilterMetric] = {
    "reward": lambda rewards, scores: rewards,
    "score": lambda rewards, scores: scores,
    "accuracy": lambda rewards, scores: (scores >= 1.0).to(scores.dtype),
}


def filter_values(metric: str, rewards: Tensor, scores: Tensor) -> Tensor:
    """The values `metric` compares within each group.

    rewards, scores: (num_groups, group_size) float, the shaped rewards and the verifier's scores.
    """
    fn = FILTER_METRICS.get(metric)
    if fn is None:
        raise ValueError(f"unknown dynamic-sampling metric {metric!r}; choose one of {sorted(FILTER_METRICS)}")
    if rewards.shape != scores.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and scores {tuple(scores.shape)} must have one shape")
    return fn(rewards, scores)


def informative_groups(values: Tensor) -> Tensor:
    """(num_groups,) bool: the groups whose values are not all equal.

    values: (num_groups, group_size) float with group_size >= 2.

    >>> informative_groups(torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    tensor([ True, False, False])
    """
    _check_rewards(values, "values")
    if values.shape[1] < 2:
        raise ValueError(f"dynamic sampling compares the samples of a group: group_size must be >= 2, got "
                         f"{values.shape[1]}")
    return values.amax(dim=1) != values.amin(dim=1)


def fill_batch(kept: list, candidates: list, informative: list[bool], target: int) -> tuple[list, int]:
    """(kept + the informative candidates, in order, up to `target`; informative ones left over).

    The order a step's groups are trained in is the order they were generated in, round by round,
    and surplus informative groups of the last round are dropped (verl: `batch[:traj_bsz]`).
    """
    if len(candidates) != len(informative):
        raise ValueError(f"{len(candidates)} groups but {len(informative)} informative flags")
    new = [group for group, keep in zip(candidates, informative) if keep]
    room = max(0, target - len(kept))
    return kept + new[:room], max(0, len(new) - room)
