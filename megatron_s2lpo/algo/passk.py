"""pass@k and avg@k metrics for sampled evaluation.

pass@k uses the unbiased estimator of Chen et al. (2021): with n samples of which c are correct,
pass@k = 1 - C(n - c, k) / C(n, k). The ratio is evaluated as the product
prod_{j=0}^{k-1} (n - c - j) / (n - j) of factors in [0, 1], so n in the thousands never forms a
huge binomial and never overflows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _check_counts(n: int, c: int, k: int) -> None:
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"pass@k: {name} must be an int, got {value!r}")
    if n < 1:
        raise ValueError(f"pass@k: n (samples per problem) must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k: c (correct samples) must be in [0, n={n}], got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k: k must be in [1, n={n}], got {k}; sample at least k completions")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n samples, c of them correct.

    >>> pass_at_k(10, 0, 5), pass_at_k(10, 10, 1), pass_at_k(4, 2, 1)
    (0.0, 1.0, 0.5)
    """
    _check_counts(n, c, k)
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    all_wrong = 1.0  # C(n - c, k) / C(n, k)
    for j in range(k):
        all_wrong *= (n - c - j) / (n - j)
    return 1.0 - all_wrong


def pass_at_k_curve(num_correct: Sequence[int] | torch.Tensor, n: int, k_max: int) -> list[float]:
    """Mean pass@k over problems for k = 1..k_max (entry k-1 is pass@k).

    num_correct: (num_problems,) correct-sample counts, each problem sampled n times.
    Vectorised: one (num_problems, k_max) cumulative product in float64.
    """
    counts = torch.as_tensor(num_correct)
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"num_correct must be a non-empty 1-D sequence of counts, got shape {tuple(counts.shape)}")
    if counts.is_floating_point() and not bool((counts == counts.round()).all()):
        raise ValueError("num_correct must hold whole numbers of correct samples")
    _check_counts(n, 0, k_max)
    counts = counts.to(torch.float64)
    bad = (counts < 0) | (counts > n)
    if bool(bad.any()):
        row = int(torch.nonzero(bad)[0])
        raise ValueError(f"num_correct[{row}] = {int(counts[row])} is outside [0, n={n}]")
    j = torch.arange(k_max, dtype=torch.float64)  # (K,)
    factors = ((n - counts[:, None] - j) / (n - j)).clamp(min=0.0)  # (P, K)
    all_wrong = torch.cumprod(factors, dim=1)  # (P, K): C(n-c, k) / C(n, k) for k = 1..K
    return (1.0 - all_wrong).mean(dim=0).tolist()


def avg_at_k_pass1(scores: Sequence[Sequence[float]] | torch.Tensor) -> float:
    """avg@k: pass@1 averaged over k samples per problem, then over problems.

    scores: (num_problems, k) per-sample correctness in [0, 1] (rows may differ in length when
    given as nested sequences; each problem still weighs the same).

    >>> avg_at_k_pass1([[1, 0, 0, 1], [1, 1]])
    0.75
    """
    if isinstance(scores, torch.Tensor):
        if scores.dim() != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
            raise ValueError(f"scores must have shape (num_problems, k) with both > 0, got {tuple(scores.shape)}")
        return float(scores.to(torch.float64).mean(dim=1).mean())
    if len(scores) == 0:
        raise ValueError("scores must hold at least one problem")
    per_problem = []
    for row, samples in enumerate(scores):
        if len(samples) == 0:
            raise ValueError(f"scores[{row}] has no samples; every problem needs k >= 1 scored samples")
        per_problem.append(sum(float(s) for s in samples) / len(samples))
    return sum(per_problem) / len(per_problem)
