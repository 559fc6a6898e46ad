"""PODS selectors against brute force over all m-subsets."""

import itertools

import pytest
import torch

from megatron_s2lpo.algo.pods import (
    SELECTORS,
    max_reward_indices,
    max_variance_indices,
    random_indices,
    select,
)


def variance(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / len(values)


def brute_force_max_variance(row: list[float], m: int) -> float:
    return max(variance([row[i] for i in subset]) for subset in itertools.combinations(range(len(row)), m))


def check_valid_indices(indices: torch.Tensor, num_groups: int, n: int, m: int) -> None:
    assert indices.dtype == torch.long and indices.shape == (num_groups, m)
    for row in indices.tolist():
        assert row == sorted(row) and len(set(row)) == m and all(0 <= i < n for i in row)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 10])
def test_max_variance_equals_brute_force(n):
    gen = torch.Generator().manual_seed(n)
    continuous = torch.randn(12, n, generator=gen, dtype=torch.float64)
    binary = (torch.rand(12, n, generator=gen) > 0.6).double()
    few_levels = torch.randint(0, 3, (12, n), generator=gen).float()  # many ties
    for rewards in (continuous, binary, few_levels):
        for m in range(1, n + 1):
            kept = max_variance_indices(rewards, m)
            check_valid_indices(kept, 12, n, m)
            for row, idx in zip(rewards.double().tolist(), kept.tolist()):
                got = variance([row[i] for i in idx])
                assert got == pytest.approx(brute_force_max_variance(row, m), rel=1e-9, abs=1e-12)


def test_m_equals_n_keeps_everything():
    rewards = torch.randn(5, 7)
    expected = torch.arange(7).expand(5, 7)
    for fn in SELECTORS.values():
        assert torch.equal(fn(rewards, 7), expected)


def test_max_variance_is_deterministic_and_breaks_ties_stably():
    rewards = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0, 0.0]])
    first = max_variance_indices(rewards, 2)
    assert torch.equal(first, max_variance_indices(rewards, 2))
    # One 0 and one 1: the stable sort puts the lowest-index 0 first and the highest-index 1 last.
    assert sorted(rewards[0, first[0]].tolist()) == [0.0, 1.0]
    assert first.tolist() == [[1, 4]]


def test_max_variance_large_batch_matches_per_group_search():
    # n = 64 is too large for brute force; compare with a direct per-group scan of all i.
    gen = torch.Generator().manual_seed(0)
    rewards = torch.rand(50, 64, generator=gen)
    m = 16
    kept = max_variance_indices(rewards, m)
    for row, idx in zip(rewards.double().tolist(), kept.tolist()):
        ordered = sorted(row)
        best = max(variance(ordered[: m - i] + ordered[len(row) - i :]) for i in range(m + 1))
        assert variance([row[i] for i in idx]) == pytest.approx(best, rel=1e-9)


def test_max_reward_and_random():
    rewards = torch.tensor([[0.5, 2.0, 2.0, -1.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    assert max_reward_indices(rewards, 3).tolist() == [[1, 2, 4], [0, 1, 2]]
    first = random_indices(rewards, 3, generator=torch.Generator().manual_seed(7))
    again = random_indices(rewards, 3, generator=torch.Generator().manual_seed(7))
    check_valid_indices(first, 2, 5, 3)
    assert torch.equal(first, again)
    # Every index gets drawn over many groups (uniformity is not asserted, coverage is).
    many = random_indices(torch.zeros(200, 5), 2, generator=torch.Generator().manual_seed(1))
    assert set(many.flatten().tolist()) == set(range(5))


def test_select_dispatch_and_errors():
    rewards = torch.randn(3, 6)
    assert torch.equal(select(rewards, 2, method="max_reward"), max_reward_indices(rewards, 2))
    with pytest.raises(ValueError, match="unknown PODS selection method"):
        select(rewards, 2, method="min_variance")
    for m in (0, 7):
        for fn in SELECTORS.values():
            with pytest.raises(ValueError, match="1 <= m <= n"):
                fn(rewards, m)
    with pytest.raises(ValueError, match="floating-point"):
        max_variance_indices(torch.ones(2, 4, dtype=torch.long), 2)
