"""Benchmarks of the algorithm core: PODS selection speed and math-verify reward throughput.

Run:
    .venv/bin/python benchmarks/algo_bench.py            # full run (well under a minute)
    .venv/bin/python benchmarks/algo_bench.py --quick    # smoke run (a few seconds)

Prints
1. PODS max-variance selection time for 1024 groups x n=64 rollouts, keeping m=16 (median of
   several repeats), next to a naive Python loop over groups measured in the same run, with the
   speed-up and a check that both choose subsets of equal variance.
2. math-verify rewards per second with 1 and 2 worker processes
   (`megatron_s2lpo.reward.math.MathScorer`); skipped with a note if that module is missing.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from timing import median_seconds

from megatron_s2lpo.algo.pods import max_variance_indices


def population_variance(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / len(values)


def naive_max_variance(rewards: list[list[float]], m: int) -> list[list[int]]:
    """Per group: sort, then score every top-i + bottom-(m-i) candidate from scratch."""
    kept = []
    for row in rewards:
        n = len(row)
        order = sorted(range(n), key=row.__getitem__)
        best, best_subset = -1.0, []
        for num_top in range(m + 1):
            subset = order[: m - num_top] + order[n - num_top :]
            var = population_variance([row[i] for i in subset])
            if var > best:
                best, best_subset = var, subset
        kept.append(sorted(best_subset))
    return kept


def bench_pods(num_groups: int, n: int, m: int, repeats: int) -> None:
    print(f"== PODS max-variance selection: {num_groups} groups x n={n}, keep m={m}")
    rewards = torch.rand(num_groups, n, generator=torch.Generator().manual_seed(0))
    rows = rewards.double().tolist()
    fast_s = median_seconds(lambda: max_variance_indices(rewards, m), repeats)
    naive_s = median_seconds(lambda: naive_max_variance(rows, m), max(1, repeats // 4), warmup=1)

    fast = max_variance_indices(rewards, m).tolist()
    naive = naive_max_variance(rows, m)
    worst_gap = max(
        abs(population_variance([r[i] for i in a]) - population_variance([r[i] for i in b]))
        for r, a, b in zip(rows, fast, naive)
    )
    print(f"vectorised (sort + prefix sums) : {fast_s * 1e3:9.3f} ms  (median of {repeats})")
    print(f"naive Python loop over groups   : {naive_s * 1e3:9.3f} ms  (median of {max(1, repeats // 4)})")
    print(f"speed-up                        : {naive_s / fast_s:9.1f} x")
    print(f"equal variance in every group   : {worst_gap < 1e-12}  (max |var gap| = {worst_gap:.2e})")
    print(f"torch threads                   : {torch.get_num_threads()}")


def make_math_samples(count: int) -> tuple[list[str], list[str], int]:
    """Mixed completions (fractions, decimals, integers, wrong answers) and their ground truths."""
    rng = random.Random(0)
    completions, truths, num_correct = [], [], 0
    for _ in range(count):
        den = rng.choice([2, 4, 5, 8])
        num = rng.randint(1, 3 * den)
        value = num / den
        truths.append(f"\\frac{{{num}}}{{{den}}}")
        kind = rng.choice(["latex", "slash", "decimal", "wrong", "wrong_decimal"])
        if kind == "latex":
            answer = f"\\frac{{{num}}}{{{den}}}"
        elif kind == "slash":
            answer = f"{num}/{den}"
        elif kind == "decimal":
            answer = f"{value:g}"
        elif kind == "wrong":
            answer = f"\\frac{{{num + 1}}}{{{den}}}"
        else:
            answer = f"{value + 0.5:g}"
        num_correct += not kind.startswith("wrong")
        completions.append(f"Let us compute step by step. ... so the result is \\boxed{{{answer}}}.")
    return completions, truths, num_correct


def bench_rewards(count: int, timeout_s: float) -> None:
    print(f"\n== math-verify rewards: {count} mixed completions")
    try:
        from megatron_s2lpo.reward.math import MathScorer
    except ImportError as err:
        print(f"skipped: megatron_s2lpo.reward.math is not available ({err})")
        return
    completions, truths, num_correct = make_math_samples(count)
    for num_workers in (1, 2):
        start = time.perf_counter()
        with MathScorer(num_workers=num_workers, timeout_s=timeout_s) as scorer:
            scorer.score(completions[:4], truths[:4])  # warm-up: workers import math-verify
            ready = time.perf_counter()
            scores = scorer.score(completions, truths)
            elapsed = time.perf_counter() - ready
        print(
            f"workers={num_workers}: {count / elapsed:8.1f} rewards/s  "
            f"(score {elapsed:.2f} s, start-up {ready - start:.2f} s, "
            f"scored correct {int(sum(scores))} / expected {num_correct})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few repeats and samples (smoke run)")
    args = parser.parse_args()
    bench_pods(num_groups=1024, n=64, m=16, repeats=4 if args.quick else 20)
    bench_rewards(count=40 if args.quick else 300, timeout_s=5.0)


if __name__ == "__main__":
    main()
