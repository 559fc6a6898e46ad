"""PODS down-sampling: keep m of the n rollouts of each prompt for the policy update.

Max-variance selection (PODS paper): the m-subset with the largest reward variance consists of
the i largest and the m - i smallest rewards for some i in 0..m. So sort each group once and
score all m + 1 candidates at once with prefix sums of x and x^2: O(n log n) per group,
vectorised over groups. Advantages are then recomputed over the m kept samples
(`advantages.group_advantages` on the gathered rewards).

Every selector has the signature `(rewards, m, *, generator=None) -> LongTensor (num_groups, m)`
and returns the kept indices of each row in ascending order; `SELECTORS` maps names to them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron_s2lpo.algo.advantages import _check_rewards

Selector = Callable[..., torch.Tensor]

_TIE_TOL = 1e-12  # relative; float64 prefix-sum noise is ~1e-16 * n


def _check_m(rewards: torch.Tensor, m: int) -> None:
    _check_rewards(rewards)
    n = rewards.shape[1]
    if not 1 <= m <= n:
        raise ValueError(f"m (samples kept per group) must satisfy 1 <= m <= n = {n}, got {m}")


def max_variance_indices(
    rewards: torch.Tensor, m: int, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Indices of the m rewards with the maximum variance in each group.

    rewards: (num_groups, n) float -> (num_groups, m) long, each row ascending.
    Ties are broken deterministically: the sort is stable (equal rewards keep index order) and,
    among equally good candidates, the one with fewer top elements wins. `generator` is unused
    (uniform selector signature).
    """
    _check_m(rewards, m)
    num_groups, n = rewards.shape
    # float64 and centring keep the E[x^2] - E[x]^2 cancellation far below real variance gaps.
    x = rewards.detach().to(torch.float64)
    x = x - x.mean(dim=1, keepdim=True)
    sorted_x, order = torch.sort(x, dim=1, stable=True)  # (G, n) ascending
    zeros = sorted_x.new_zeros(num_groups, 1)
    prefix = torch.cat([zeros, sorted_x.cumsum(dim=1)], dim=1)  # (G, n+1): sum of first j
    prefix_sq = torch.cat([zeros, (sorted_x * sorted_x).cumsum(dim=1)], dim=1)

    num_top = torch.arange(m + 1, device=x.device)  # (m+1,) i = number taken from the top
    bottom_end = m - num_top  # the bottom m - i are sorted_x[:, :m-i]
    top_start = n - num_top  # the top i are sorted_x[:, n-i:]
    sums = prefix[:, bottom_end] + prefix[:, n : n + 1] - prefix[:, top_start]  # (G, m+1)
    sums_sq = prefix_sq[:, bottom_end] + prefix_sq[:, n : n + 1] - prefix_sq[:, top_start]
    variance = sums_sq / m - (sums / m) ** 2  # (G, m+1), population variance of each candidate
    # First candidate within rounding noise of the maximum: ties go to fewer top elements.
    best = variance.amax(dim=1, keepdim=True)  # (G, 1)
    near_best = variance >= best - _TIE_TOL * (1.0 + best)
    best_top = torch.argmax(near_best.to(torch.int8), dim=1)  # (G,) first True

    # Candidate i keeps sorted positions [0, m-i) and [n-i, n): position p < m-i or p >= n-i.
    positions = torch.arange(m, device=x.device).unsqueeze(0)  # (1, m)
    num_bottom = (m - best_top).unsqueeze(1)  # (G, 1)
    sorted_pos = torch.where(positions < num_bottom, positions, positions + (n - m))  # (G, m)
    kept = torch.gather(order, 1, sorted_pos)
    return torch.sort(kept, dim=1).values


def max_reward_indices(
    rewards: torch.Tensor, m: int, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Indices of the m largest rewards per group (ties: lower index first); rows ascending."""
    _check_m(rewards, m)
    order = torch.sort(rewards.detach(), dim=1, descending=True, stable=True).indices
    return torch.sort(order[:, :m], dim=1).values


def random_indices(
    rewards: torch.Tensor, m: int, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """m indices per group drawn uniformly without replacement; rows ascending.

    Pass a seeded `generator` (on the rewards' device) for reproducible draws.
    """
    _check_m(rewards, m)
    keys = torch.rand(rewards.shape, generator=generator, device=rewards.device)
    return torch.sort(torch.argsort(keys, dim=1)[:, :m], dim=1).values


SELECTORS: dict[str, Selector] = {
    "max_variance": max_variance_indices,
    "max_reward": max_reward_indices,
    "random": random_indices,
}


def select(
    rewards: torch.Tensor, m: int, *, method: str = "max_variance", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Dispatch to `SELECTORS[method]`, with a clear error for an unknown name."""
    fn = SELECTORS.get(method)
    if fn is None:
        raise ValueError(f"unknown PODS selection method {method!r}; choose one of {sorted(SELECTORS)}")
    return fn(rewards, m, generator=generator)
