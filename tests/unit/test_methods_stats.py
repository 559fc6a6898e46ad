"""benchmarks/methods_stats.py against slow, obvious references: the Student t quantile against
Simpson integration of the t density, intervals and paired differences against float64 loops
over hand-made seeds, the area under a curve against a fine piecewise-linear sum, the crossover
against a scan of every k."""

from __future__ import annotations

import importlib.util
import math
import random
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


stats = load("methods_stats")


def t_density(x: float, df: int) -> float:
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    return c * (1 + x * x / df) ** (-(df + 1) / 2)


def t_cdf_reference(t: float, df: int, intervals: int = 20000) -> float:
    """0.5 + the integral of the density from 0 to t (composite Simpson)."""
    h = t / intervals
    total = t_density(0, df) + t_density(t, df)
    total += sum((4 if i % 2 else 2) * t_density(i * h, df) for i in range(1, intervals))
    return 0.5 + total * h / 3


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 9, 19, 30])
@pytest.mark.parametrize("p", [0.9, 0.975, 0.995])
def test_t_quantile_inverts_the_integrated_density(df, p):
    t = stats.t_quantile(p, df)
    assert t_cdf_reference(t, df) == pytest.approx(p, abs=2e-7)
    assert stats.t_quantile(1 - p, df) == pytest.approx(-t)


def test_t_quantile_matches_printed_tables():
    # two-sided 95% critical values from any t table
    for df, value in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)):
        assert stats.t_quantile(0.975, df) == pytest.approx(value, abs=1e-4)
    assert stats.t_quantile(0.975, 10_000) == pytest.approx(1.95996, abs=1e-3)  # -> the normal
    assert stats.t_cdf(0.0, 3) == pytest.approx(0.5)


def test_mean_interval_against_a_loop():
    rng = random.Random(3)
    for n in (2, 3, 5, 8):
        values = [rng.uniform(0, 1) for _ in range(n)]
        mean = 0.0
        for v in values:
            mean += v
        mean /= n
        var = 0.0
        for v in values:
            var += (v - mean) ** 2
        half = stats.t_quantile(0.975, n - 1) * math.sqrt(var / (n - 1)) / math.sqrt(n)
        iv = stats.mean_interval(values)
        assert (iv.mean, iv.low, iv.high, iv.n) == pytest.approx((mean, mean - half, mean + half, n), abs=1e-12)
    one = stats.mean_interval([0.4])
    assert one.mean == 0.4 and math.isnan(one.low) and one.text() == "0.400"
    assert math.isnan(stats.mean_interval([]).mean)
    with pytest.raises(ValueError, match="level"):
        stats.mean_interval([1, 2], level=1.5)


def test_paired_difference_uses_only_shared_seeds():
    a = {1: 0.30, 2: 0.25, 3: 0.40, 4: None, 5: 0.1}
    b = {1: 0.20, 2: 0.30, 3: 0.35, 4: 0.3}
    diff = stats.paired_difference(a, b)
    assert diff.diffs == pytest.approx({1: 0.10, 2: -0.05, 3: 0.05})
    assert (diff.wins, diff.ties, diff.losses) == (2, 0, 1)
    ref = stats.mean_interval([0.10, -0.05, 0.05])
    assert (diff.interval.mean, diff.interval.low, diff.interval.high) == pytest.approx((ref.mean, ref.low, ref.high))
    assert "(2/3 seeds > 0)" in diff.text()


def test_area_under_curve_against_a_fine_sum():
    steps, values = [0, 20, 40, 100, 200], [0.18, 0.10, 0.15, 0.22, 0.27]

    def at(x):  # piecewise linear interpolation
        for s0, s1, v0, v1 in zip(steps, steps[1:], values, values[1:]):
            if s0 <= x <= s1:
                return v0 + (v1 - v0) * (x - s0) / (s1 - s0)

    fine = 20000
    reference = sum(at((i + 0.5) * 200 / fine) for i in range(fine)) / fine  # midpoint rule
    assert stats.area_under_curve(steps, values) == pytest.approx(reference, abs=1e-9)
    with pytest.raises(ValueError, match="increase"):
        stats.area_under_curve([0, 20, 20], [0.1, 0.2, 0.3])


def test_first_reaching_and_crossover_against_a_scan():
    assert stats.first_reaching([0, 20, 40], [0.1, 0.3, 0.5], 0.3) == 20
    assert stats.first_reaching([0, 20, 40], [0.1, 0.3, 0.5], 0.6) is None
    rng = random.Random(0)
    for _ in range(200):
        learner = sorted(rng.uniform(0, 1) for _ in range(8))
        explorer = sorted(rng.uniform(0, 1) for _ in range(8))
        got = stats.crossover_k(learner, explorer)
        if explorer[0] >= learner[0]:
            assert got is None
            continue
        stays = [k for k in range(1, 9) if all(explorer[j - 1] > learner[j - 1] for j in range(k, 9))]
        assert got == (min(stays) if stays else None)


def test_summary_of_hand_made_runs():
    sys.path.insert(0, str(BENCH))  # methods_report imports methods_stats by name
    report = load("methods_report")
    steps = [0, 10, 20]

    def run(acc, flops):
        return {"steps": steps, "acc": acc, "flops": flops, "tokens": [f / 10 for f in flops]}

    runs = {"grpo": {1: run([0.2, 0.1, 0.3], [0, 10, 20]), 2: run([0.2, 0.2, 0.4], [0, 10, 20]),
                     3: run([0.1, 0.1, 0.2], [0, 10, 20])},
            "s2lpo": {1: run([0.2, 0.3, 0.5], [0, 6, 12]), 2: run([0.2, 0.1, 0.3], [0, 6, 12]),
                      3: run([0.1, 0.2, 0.4], [0, 6, 12]), 4: run([0.0, 0.0, 0.0], [0, 6, 12])}}
    curves = {s: {"heldout": {"learner": [0.5, 0.6, 0.7], "explorer": [0.2, 0.65, 0.9]}} for s in (1, 2, 3)}
    summary = report.summarize(runs, curves, methods=["grpo", "s2lpo"], report_steps=[10, 99], target_gain=None)
    assert summary["seeds"] == [1, 2, 3] and summary["incomplete"] == {"grpo": [], "s2lpo": [4]}
    assert summary["report_steps"] == [10, 20]  # 99 is not an evaluation; the last one is always shown
    assert summary["curve"]["s2lpo"][20]["mean"] == pytest.approx(0.4)
    (pair,) = summary["pairs"]
    assert pair["steps"][20]["diffs"] == pytest.approx({1: 0.2, 2: -0.1, 3: 0.2})
    assert pair["steps"][20]["wins"] == 2
    auc_s2lpo_1 = (0.2 + 2 * 0.3 + 0.5) / 4  # trapezoids over two equal intervals
    assert summary["per_seed"]["s2lpo"][1]["auc"] == pytest.approx(auc_s2lpo_1)
    assert summary["per_seed"]["grpo"][1]["drop"] == pytest.approx(-0.1)  # lowest after step 0 minus step 0
    assert summary["drop_seeds_below"] == {"grpo": 1, "s2lpo": 1}
    # target: each seed's own step 0 + half the best mean gain at the last step (s2lpo's
    # (0.3 + 0.1 + 0.3) / 3 against grpo's (0.1 + 0.2 + 0.1) / 3); step 0 itself never counts
    assert summary["target_gain"] == pytest.approx(0.7 / 3 / 2)
    cost = summary["cost"]["grpo"]  # reaches 0.2 + 0.117 on seed 2 only
    assert (cost["reached"], cost["of"]) == (1, 3) and cost["flops"]["mean"] == pytest.approx(20)
    assert summary["cost"]["s2lpo"]["per_seed"] == {1: {"step": 20, "flops": 12, "tokens": 1.2},
                                                    3: {"step": 20, "flops": 12, "tokens": 1.2}}
    # a given gain; 0 is met by a seed's first evaluation that does not fall below its step 0
    summary = report.summarize(runs, curves, methods=["grpo", "s2lpo"], report_steps=[10], target_gain=0.0)
    assert sorted(summary["cost"]["grpo"]["per_seed"].items()) == [
        (1, {"step": 20, "flops": 20, "tokens": 2.0}), (2, {"step": 10, "flops": 10, "tokens": 1.0}),
        (3, {"step": 10, "flops": 10, "tokens": 1.0})]
    passk = summary["passk"]["heldout"]
    assert passk["crossover"] == {1: 2, 2: 2, 3: 2} and passk["learner_ahead_at_1"] == 3
