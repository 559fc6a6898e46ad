"""Checkpoints (atomic save, identical resume, interrupted save, resharding) and the reference model.

One 2-process launch (scripts/ckpt_checks.py) runs every check; each test asserts one of them.
"""

import pytest

from conftest import assert_check, run_checks

CHECKS = [
    "reference_starts_as_policy_copy",
    "checkpoint_resume_gives_identical_next_step",
    "interrupted_save_leaves_previous_checkpoint",
    "checkpoint_errors_are_clear",
    "save_leaves_no_helper_process",
    "damaged_or_planted_newest_falls_back_to_previous",
    "full_disk_is_named_and_keeps_the_previous_checkpoint",
    "reference_loads_from_checkpoint",
    "checkpoint_reshards_dp2_distopt_to_tp2",
    "checkpoint_optimizer_kind_mismatch_is_clear",
]


@pytest.fixture(scope="module")
def checks():
    return run_checks("ckpt_checks.py", timeout=240)


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", CHECKS)
def test_checkpoint(checks, name):
    assert_check(checks, name)
