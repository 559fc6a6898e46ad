"""pass@k against exact binomials (fractions.Fraction + math.comb)."""

import doctest
import random
from fractions import Fraction
from math import comb

import pytest
import torch

from megatron_s2lpo.algo import passk
from megatron_s2lpo.algo.passk import avg_at_k_pass1, pass_at_k, pass_at_k_curve


def ref_pass_at_k(n: int, c: int, k: int) -> float:
    return float(1 - Fraction(comb(n - c, k), comb(n, k)))  # comb(a, k) == 0 when a < k


def test_docstring_examples():
    assert doctest.testmod(passk).failed == 0


def test_matches_exact_binomials_small():
    for n in range(1, 21):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(ref_pass_at_k(n, c, k), rel=1e-12, abs=1e-15)


def test_edge_cases():
    assert pass_at_k(16, 0, 1) == 0.0 and pass_at_k(16, 0, 16) == 0.0
    assert pass_at_k(16, 16, 1) == 1.0
    assert pass_at_k(16, 14, 3) == 1.0  # n - c = 2 < k: every 3-subset has a correct one
    assert pass_at_k(16, 4, 1) == pytest.approx(0.25)  # pass@1 is the accuracy


def test_large_n_is_stable():
    rng = random.Random(0)
    for _ in range(20):
        n = 5000
        c, k = rng.randint(0, n), rng.randint(1, n)
        got = pass_at_k(n, c, k)
        assert 0.0 <= got <= 1.0
        assert got == pytest.approx(ref_pass_at_k(n, c, k), rel=1e-9, abs=1e-12)
    assert pass_at_k(5000, 1, 2500) == pytest.approx(0.5, rel=1e-12)
    assert pass_at_k(5000, 3, 1) == pytest.approx(3 / 5000, rel=1e-12)


@pytest.mark.parametrize(
    "args,match",
    [((0, 0, 1), "n"), ((10, 11, 1), "c"), ((10, -1, 1), "c"), ((10, 3, 0), "k"), ((10, 3, 11), "k"),
     ((10.0, 3, 1), "int"), ((10, 3, True), "int")],
)  # fmt: skip
def test_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        pass_at_k(*args)


@pytest.mark.parametrize("n,k_max", [(16, 16), (64, 10), (5000, 50)])
def test_curve_matches_scalar_mean(n, k_max):
    rng = random.Random(n)
    counts = [rng.randint(0, n) for _ in range(30)] + [0, n, n - 1]
    curve = pass_at_k_curve(counts, n, k_max)
    assert len(curve) == k_max
    for k in range(1, k_max + 1):
        expected = sum(ref_pass_at_k(n, c, k) for c in counts) / len(counts)
        assert curve[k - 1] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert curve == sorted(curve)  # pass@k never decreases with k
    assert pass_at_k_curve(torch.tensor(counts), n, k_max) == pytest.approx(curve, rel=1e-15)


def test_curve_rejects_bad_counts():
    with pytest.raises(ValueError, match=r"num_correct\[1\]"):
        pass_at_k_curve([3, 17], 16, 4)
    with pytest.raises(ValueError, match="k"):
        pass_at_k_curve([3], 16, 17)
    with pytest.raises(ValueError, match="non-empty"):
        pass_at_k_curve([], 16, 4)
    with pytest.raises(ValueError, match="whole numbers"):
        pass_at_k_curve(torch.tensor([1.5]), 16, 4)


def test_avg_at_k_pass1():
    scores = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    expected = (0.75 + 0.0 + 1.0) / 3
    assert avg_at_k_pass1(scores) == pytest.approx(expected)
    assert avg_at_k_pass1(scores.tolist()) == pytest.approx(expected)
    # avg@k equals the mean pass@1 estimate of each problem.
    assert avg_at_k_pass1(scores) == pytest.approx(sum(pass_at_k(4, c, 1) for c in (3, 0, 4)) / 3)
    with pytest.raises(ValueError):
        avg_at_k_pass1([])
    with pytest.raises(ValueError, match=r"scores\[1\]"):
        avg_at_k_pass1([[1.0], []])
    with pytest.raises(ValueError):
        avg_at_k_pass1(torch.ones(3))
