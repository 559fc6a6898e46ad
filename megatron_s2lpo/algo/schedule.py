"""Explorer share schedules: how much of each GRPO group the frozen explorer samples.

S2L-PO (paper, Algorithm 1): at 1-indexed step i the explorer supplies
`G_w = ceil(alpha_i * G)` of the G samples of every group and the learner the other
`G_s = G - G_w`, with the linear anneal

    alpha_i = 1 - (i - 1) / (T_mix - 1)   for i <= T_mix,   0 afterwards,

so step 1 is all explorer and step T_mix is the first step with alpha 0. After T_mix training
is plain on-policy GRPO.

Degenerate T_mix: `t_mix == 0` means no explorer at all (alpha 0 from step 1); `t_mix == 1`
gives alpha 1 at step 1 and 0 afterwards (the formula's 0/0 at step 1 is read as "start of the
anneal").

Other schedules (ablations) are chosen by name through `SCHEDULES`:
  linear    the paper's anneal above (computed in exact fractions)
  cosine    1 -> 0 over the same T_mix steps, half a cosine period
  step      the paper's "abrupt" ablation: alpha 1 for i <= T_mix, then 0
  constant  a fixed `constant_share` for i <= T_mix, then 0

Rounding: `rounding="paper"` (default) gives `G_s = G - G_w`. `rounding="released"` reproduces
the authors' released script, which takes ceil of both counts, so G_w + G_s can exceed G
(e.g. 9 + 8 = 17 for G = 16 at alpha = 0.53).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction

# Share values that are exactly representable are Fractions (no float error at all); the float
# schedules (cosine, constant) absorb rounding noise with this tolerance before ceil, so that
# 4.000000000001 counts as 4 samples, not 5. Real non-integer products are >= 1/(T_mix-1) or
# about 1e-3 away from an integer, far above it.
_CEIL_TOL = 1e-9

Share = Fraction | float
ScheduleFn = Callable[[int, int, float], Share]


def _linear(step: int, t_mix: int, constant_share: float) -> Share:
    if t_mix == 1:
        return Fraction(1)
    return Fraction(t_mix - step, t_mix - 1)


def _cosine(step: int, t_mix: int, constant_share: float) -> Share:
    if t_mix == 1:
        return 1.0
    progress = (step - 1) / (t_mix - 1)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _step(step: int, t_mix: int, constant_share: float) -> Share:
    return Fraction(1)


def _constant(step: int, t_mix: int, constant_share: float) -> Share:
    return constant_share


# Each function is only called for 1 <= step <= t_mix (t_mix >= 1); outside that window the
# share is 0 for every schedule.
SCHEDULES: dict[str, ScheduleFn] = {
    "linear": _linear,
    "cosine": _cosine,
    "step": _step,
    "constant": _constant,
}

ROUNDINGS = ("paper", "released")


def _check_step(step: int, t_mix: int) -> None:
    if t_mix < 0:
        raise ValueError(f"t_mix must be >= 0 (0 disables the explorer), got {t_mix}")
    if step < 1:
        raise ValueError(f"step is 1-indexed and must be >= 1, got {step}")


def _share(step: int, t_mix: int, schedule: str, constant_share: float) -> Share:
    fn = SCHEDULES.get(schedule)
    if fn is None:
        raise ValueError(f"unknown explorer schedule {schedule!r}; choose one of {sorted(SCHEDULES)}")
    if not 0.0 <= constant_share <= 1.0:
        raise ValueError(f"constant_share must be in [0, 1], got {constant_share}")
    _check_step(step, t_mix)
    if step > t_mix:  # also covers t_mix == 0
        return Fraction(0)
    return fn(step, t_mix, constant_share)


def explorer_share(step: int, t_mix: int) -> float:
    """Paper's linear explorer share alpha at 1-indexed `step` (see the module docstring).

    >>> [explorer_share(i, 5) for i in range(1, 7)]
    [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    >>> explorer_share(1, 1), explorer_share(2, 1), explorer_share(1, 0)
    (1.0, 0.0, 0.0)
    """
    return float(_share(step, t_mix, "linear", 0.0))


def schedule_share(step: int, t_mix: int, *, schedule: str = "linear", constant_share: float = 0.5) -> float:
    """Explorer share alpha at `step` under any schedule in `SCHEDULES` (for logging)."""
    return float(_share(step, t_mix, schedule, constant_share))


def _ceil_count(share: Share, group_size: int) -> int:
    if isinstance(share, Fraction):
        return math.ceil(share * group_size)
    product = share * group_size
    return math.ceil(product - _CEIL_TOL * max(1.0, abs(product)))


def split_group(
    step: int,
    group_size: int,
    t_mix: int,
    *,
    schedule: str = "linear",
    rounding: str = "paper",
    constant_share: float = 0.5,
) -> tuple[int, int]:
    """(g_explorer, g_learner): how many of a group's samples each model generates at `step`.

    g_explorer = ceil(alpha * group_size); g_learner = group_size - g_explorer under
    `rounding="paper"`, or ceil((1 - alpha) * group_size) under `rounding="released"` (the sum may
    then exceed group_size by one). `constant_share` is only read by the "constant" schedule.

    >>> split_group(1, 16, 9), split_group(2, 16, 9), split_group(9, 16, 9)
    ((16, 0), (14, 2), (0, 16))
    >>> split_group(8, 16, 16, rounding="released")
    (9, 8)
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; choose one of {list(ROUNDINGS)}")
    share = _share(step, t_mix, schedule, constant_share)
    num_explorer = min(group_size, max(0, _ceil_count(share, group_size)))
    if rounding == "paper":
        return num_explorer, group_size - num_explorer
    learner_share = 1 - share  # stays a Fraction for exact schedules
    num_learner = min(group_size, max(0, _ceil_count(learner_share, group_size)))
    return num_explorer, num_learner


# ----------------------------------------------------------------------------- temperature

TEMPERATURE_SCHEDULES = ("constant", "linear")


def sampling_temperature(step: int, start: float, *, schedule: str = "constant", end: float = 1.0,
                         steps: int = 0) -> float:
    """The learner's sampling temperature at 1-indexed `step` (the token-level diversity baseline).

    constant: `start` at every step. linear: `start` at step 1, `end` at step 1 + `steps` and
    after, linear in between.

    >>> [round(sampling_temperature(i, 1.4, schedule="linear", end=1.0, steps=4), 2) for i in range(1, 7)]
    [1.4, 1.3, 1.2, 1.1, 1.0, 1.0]
    """
    if step < 1:
        raise ValueError(f"step must be >= 1 (steps are 1-indexed), got {step}")
    if not start > 0 or not end > 0:
        raise ValueError(f"temperatures must be > 0, got start={start} end={end}")
    if schedule == "constant":
        return float(start)
    if schedule != "linear":
        raise ValueError(f"algo.temperature.schedule: unknown schedule {schedule!r}; choose one of "
                         f"{list(TEMPERATURE_SCHEDULES)}")
    if steps < 1:
        raise ValueError(f"a linear temperature schedule needs steps >= 1, got {steps}")
    progress = min(1.0, (step - 1) / steps)
    return float(start + (end - start) * progress)
