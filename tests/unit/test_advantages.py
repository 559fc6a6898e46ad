"""Group advantages against a float64 Python loop reference."""

import doctest
import math

import pytest
import torch

from megatron_s2lpo.algo import advantages
from megatron_s2lpo.algo.advantages import group_advantages


def ref_advantages(rows: list[list[float]], normalize_std: bool, eps: float) -> list[list[float]]:
    out = []
    for row in rows:
        n = len(row)
        mean = sum(row) / n
        if n == 1 or max(row) == min(row):
            out.append([0.0] * n)
            continue
        std = math.sqrt(sum((r - mean) ** 2 for r in row) / (n - 1))  # unbiased
        scale = (std + eps) if normalize_std else 1.0
        out.append([(r - mean) / scale for r in row])
    return out


def test_docstring_examples():
    assert doctest.testmod(advantages).failed == 0


@pytest.mark.parametrize("normalize_std", [True, False])
@pytest.mark.parametrize("group_size", [2, 3, 8, 16])
def test_matches_loop_reference(normalize_std, group_size):
    gen = torch.Generator().manual_seed(group_size)
    continuous = torch.randn(20, group_size, generator=gen, dtype=torch.float64)
    binary = (torch.rand(20, group_size, generator=gen) > 0.5).double()
    for rewards in (continuous, binary):
        got = group_advantages(rewards, normalize_std=normalize_std, eps=1e-6)
        expected = torch.tensor(ref_advantages(rewards.tolist(), normalize_std, 1e-6), dtype=torch.float64)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_float32_keeps_dtype():
    rewards = torch.rand(4, 8)
    out = group_advantages(rewards)
    assert out.dtype == torch.float32 and out.shape == (4, 8)
    expected = torch.tensor(ref_advantages(rewards.double().tolist(), True, 1e-6))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_all_equal_groups_are_exactly_zero():
    # 0.1 is not exact in binary; a mean of copies may not reproduce it exactly.
    rewards = torch.tensor([[0.1] * 7, [1.0] * 7, [0.0] * 7, [0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3]])
    for normalize_std in (True, False):
        out = group_advantages(rewards, normalize_std=normalize_std)
        assert torch.equal(out, torch.zeros_like(rewards))


def test_mixed_groups_are_normalised_together():
    # Explorer samples (first half) and learner samples share one mean and std.
    rewards = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    out = group_advantages(rewards)
    mean, std = 3 / 8, math.sqrt((3 * (5 / 8) ** 2 + 5 * (3 / 8) ** 2) / 7)
    assert out[0, 0].item() == pytest.approx((1 - mean) / (std + 1e-6), rel=1e-6)
    assert out[0, 7].item() == pytest.approx((0 - mean) / (std + 1e-6), rel=1e-6)


def test_group_size_one_and_empty():
    assert torch.equal(group_advantages(torch.tensor([[3.0], [-1.0]])), torch.zeros(2, 1))
    assert group_advantages(torch.zeros(0, 4)).shape == (0, 4)


@pytest.mark.parametrize(
    "rewards,match",
    [
        (torch.zeros(8), "num_groups, group_size"),
        (torch.zeros(2, 3, 4), "num_groups, group_size"),
        (torch.zeros(2, 4, dtype=torch.long), "floating-point"),
        (torch.tensor([[0.0, 1.0], [float("nan"), 1.0]]), r"rows \[1\]"),
        ([[0.0, 1.0]], "torch.Tensor"),
    ],
)
def test_rejects_bad_input(rewards, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards)
