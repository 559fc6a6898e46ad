"""Explorer share schedules and group splits against exact-fraction references."""

import doctest
import math
from fractions import Fraction

import pytest

from megatron_s2lpo.algo import schedule
from megatron_s2lpo.algo.schedule import SCHEDULES, explorer_share, schedule_share, split_group


def ref_share(step: int, t_mix: int) -> Fraction:
    """The paper's formula, written out directly."""
    if t_mix == 0 or step > t_mix:
        return Fraction(0)
    if t_mix == 1:
        return Fraction(1)
    return 1 - Fraction(step - 1, t_mix - 1)


def test_docstring_examples():
    assert doctest.testmod(schedule).failed == 0


@pytest.mark.parametrize("t_mix", [0, 1, 2, 3, 7, 50])
def test_explorer_share_matches_formula(t_mix):
    for step in range(1, t_mix + 5):
        assert explorer_share(step, t_mix) == pytest.approx(float(ref_share(step, t_mix)), abs=1e-15)


def test_explorer_share_endpoints():
    assert explorer_share(1, 10) == 1.0
    assert explorer_share(10, 10) == 0.0
    assert explorer_share(11, 10) == 0.0
    assert explorer_share(1, 1) == 1.0 and explorer_share(2, 1) == 0.0
    assert all(explorer_share(s, 0) == 0.0 for s in range(1, 5))


@pytest.mark.parametrize("step,t_mix", [(1, -1), (0, 5), (-3, 5)])
def test_explorer_share_rejects_bad_arguments(step, t_mix):
    with pytest.raises(ValueError):
        explorer_share(step, t_mix)
    with pytest.raises(ValueError):
        split_group(step, 16, t_mix)


def test_split_group_exact_rounding_all_sizes():
    """g_explorer = ceil(alpha * G) exactly, for every G in 1..64 and t_mix in 1..50."""
    for t_mix in range(1, 51):
        for step in range(1, t_mix + 2):
            share = ref_share(step, t_mix)
            for group_size in range(1, 65):
                expected = math.ceil(share * group_size)  # exact: Fraction ceil
                got = split_group(step, group_size, t_mix)
                assert got == (expected, group_size - expected), (step, group_size, t_mix)


def test_float_products_do_not_round_up():
    # alpha * G is an integer in exact arithmetic but not in floats for these cases.
    cases = [(t, s, g) for t in range(2, 51) for s in range(1, t + 1) for g in range(1, 65)]
    inexact = [
        (t, s, g) for t, s, g in cases
        if (1 - (s - 1) / (t - 1)) * g != math.ceil((1 - (s - 1) / (t - 1)) * g)
        and (ref_share(s, t) * g).denominator == 1
    ]  # fmt: skip
    assert inexact, "the reference should contain float-inexact integer products"
    for t_mix, step, group_size in inexact:
        expected = int(ref_share(step, t_mix) * group_size)
        assert split_group(step, group_size, t_mix)[0] == expected


def test_float_schedules_tolerate_rounding_noise():
    # 0.14 * 50 = 7.000000000000001 in floats; the constant schedule must still give 7.
    assert 0.14 * 50 > 7
    assert split_group(1, 50, 5, schedule="constant", constant_share=0.14) == (7, 43)
    assert split_group(6, 50, 5, schedule="constant", constant_share=0.14) == (0, 50)


def test_released_rounding_can_exceed_group_size():
    totals = []
    for t_mix in range(2, 30):
        for step in range(1, t_mix + 2):
            share = ref_share(step, t_mix)
            num_explorer, num_learner = split_group(step, 16, t_mix, rounding="released")
            assert num_explorer == math.ceil(share * 16)
            assert num_learner == math.ceil((1 - share) * 16)
            totals.append(num_explorer + num_learner)
    assert set(totals) == {16, 17}


def test_cosine_schedule():
    t_mix = 9
    for step in range(1, t_mix + 3):
        expected = 0.5 * (1 + math.cos(math.pi * (step - 1) / (t_mix - 1))) if step <= t_mix else 0.0
        assert schedule_share(step, t_mix, schedule="cosine") == pytest.approx(expected, abs=1e-12)
    assert split_group(1, 16, t_mix, schedule="cosine") == (16, 0)
    assert split_group(t_mix, 16, t_mix, schedule="cosine") == (0, 16)
    assert split_group(5, 16, t_mix, schedule="cosine") == (8, 8)  # cos(pi/2) = 6e-17, not 9
    assert split_group(1, 16, 1, schedule="cosine") == (16, 0)


def test_step_and_constant_schedules():
    for step in range(1, 8):
        inside = step <= 5
        assert split_group(step, 16, 5, schedule="step") == ((16, 0) if inside else (0, 16))
        expected = (4, 12) if inside else (0, 16)
        assert split_group(step, 16, 5, schedule="constant", constant_share=0.25) == expected
    assert split_group(1, 16, 0, schedule="step") == (0, 16)


def test_schedule_names_and_errors():
    assert set(SCHEDULES) == {"linear", "cosine", "step", "constant"}
    with pytest.raises(ValueError, match="unknown explorer schedule"):
        split_group(1, 16, 5, schedule="exponential")
    with pytest.raises(ValueError, match="rounding"):
        split_group(1, 16, 5, rounding="floor")
    with pytest.raises(ValueError, match="group_size"):
        split_group(1, 0, 5)
    with pytest.raises(ValueError, match="constant_share"):
        split_group(1, 16, 5, schedule="constant", constant_share=1.5)
