"""Statistics over seeds for `benchmarks/methods_bench.py`: t-intervals, paired differences,
area under the accuracy curve, cost to reach a target accuracy. Pure Python, no SciPy.

The 95% interval of a mean over n seeds is the Student t-interval
    mean +- t_{0.975, n-1} * sd / sqrt(n)        (sd with n - 1 in the denominator),
which assumes the per-seed values are independent draws from a roughly normal distribution;
with 5 seeds it is wide, and honest about it. A paired difference is the same interval over the
per-seed differences of two methods that share the seed (same warm start, same prompt order).

    >>> iv = mean_interval([0.2, 0.3, 0.25])
    >>> round(iv.mean, 3), round(iv.low, 3), round(iv.high, 3)
    (0.25, 0.126, 0.374)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


# ----------------------------------------------------------------------------- Student t


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta (modified Lentz, Numerical Recipes 6.4)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                    -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"incomplete_beta: x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):  # the fraction converges fast on this side
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"t_cdf: df must be > 0, got {df}")
    tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t such that P(T <= t) = p (bisection on t_cdf to 1e-12).

    >>> round(t_quantile(0.975, 4), 4)
    2.7764
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low < 1e-12 * max(1.0, high):
            break
    return 0.5 * (low + high)


# ----------------------------------------------------------------------------- intervals


@dataclass(kw_only=True, slots=True, frozen=True)
class Interval:
    """Mean of n values with its two-sided t-interval (low/high are NaN when n < 2)."""

    mean: float
    low: float
    high: float
    n: int
    level: float = 0.95

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2.0

    def text(self, digits: int = 3) -> str:
        """'0.250 [0.126, 0.374]', or the mean alone when there is no interval."""
        if math.isnan(self.mean):
            return "-"
        if math.isnan(self.low):
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def mean_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean and Student t-interval of `values` (independent per-seed results)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return Interval(mean=math.nan, low=math.nan, high=math.nan, n=0, level=level)
    mean = math.fsum(values) / n
    if n < 2:
        return Interval(mean=mean, low=math.nan, high=math.nan, n=1, level=level)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    return Interval(mean=mean, low=mean - half, high=mean + half, n=n, level=level)


@dataclass(kw_only=True, slots=True, frozen=True)
class PairedDifference:
    """Per-seed differences a - b over the seeds both have: interval and the sign count."""

    interval: Interval
    wins: int  # seeds with a > b
    ties: int
    losses: int
    diffs: dict  # seed -> a - b

    def text(self, digits: int = 3) -> str:
        iv = self.interval
        if math.isnan(iv.mean):
            return "-"
        sign = f"{iv.mean:+.{digits}f}"
        if not math.isnan(iv.low):
            sign += f" [{iv.low:+.{digits}f}, {iv.high:+.{digits}f}]"
        return f"{sign} ({self.wins}/{iv.n} seeds > 0)"


def paired_difference(a: Mapping, b: Mapping, level: float = 0.95) -> PairedDifference:
    """a[seed] - b[seed] over the seeds present (and not None) in both."""
    seeds = [s for s in a if s in b and a[s] is not None and b[s] is not None]
    diffs = {s: float(a[s]) - float(b[s]) for s in seeds}
    values = list(diffs.values())
    return PairedDifference(interval=mean_interval(values, level), wins=sum(d > 0 for d in values),
                            ties=sum(d == 0 for d in values), losses=sum(d < 0 for d in values), diffs=diffs)


# ----------------------------------------------------------------------------- curves


def area_under_curve(steps: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoidal area under values(step), divided by the step span: the curve's mean height.

    >>> area_under_curve([0, 10, 20], [0.0, 1.0, 1.0])
    0.75
    """
    if len(steps) != len(values) or len(steps) < 2:
        raise ValueError(f"area_under_curve needs >= 2 points and as many values as steps, got "
                         f"{len(steps)} steps and {len(values)} values")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"area_under_curve: steps must increase, got {list(steps)}")
    area = math.fsum((s1 - s0) * (v0 + v1) / 2.0
                     for s0, s1, v0, v1 in zip(steps, steps[1:], values, values[1:]))
    return area / (steps[-1] - steps[0])


def first_reaching(steps: Sequence[int], values: Sequence[float], target: float) -> int | None:
    """The first step whose value is >= target, or None if none is."""
    for step, value in zip(steps, values):
        if value >= target:
            return step
    return None


def crossover_k(learner: Sequence[float], explorer: Sequence[float]) -> int | None:
    """The smallest k (1-based) from which the explorer's pass@k stays above the learner's, or
    None when it never does or when the explorer is already ahead at k = 1 (no crossover: the
    explorer is then simply the stronger model)."""
    if len(learner) != len(explorer) or not learner:
        raise ValueError(f"crossover_k needs two pass@k curves of one length, got {len(learner)} and {len(explorer)}")
    if explorer[0] >= learner[0]:
        return None
    for k in range(len(learner), 0, -1):
        if explorer[k - 1] <= learner[k - 1]:
            return k + 1 if k < len(learner) else None
    return None
