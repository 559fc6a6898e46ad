"""PP=2 and PP=2 x VPP=2 vs PP=1 on the same weights: losses, per-parameter gradients, a step.

One 2-process launch (scripts/pp2_checks.py) runs every check; each test asserts one of them.
"""

import pytest

from conftest import assert_check, run_checks

CHECKS = [
    "pp2_micro_batch_invariance",
    "pp2_loss_and_grads_equal_pp1",
    "vpp2_loss_and_grads_equal_pp1",
    "pp2_logprobs_and_step_equal_pp1",
    "pp2_packed_equals_padded",
]


@pytest.fixture(scope="module")
def checks():
    return run_checks("pp2_checks.py", timeout=240)


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", CHECKS)
def test_pp2(checks, name):
    assert_check(checks, name)
