"""Pack-level padding (FP8 + sequence parallel alignment) at TP = 4, 2, 1 on 4 gloo ranks.

One 4-process launch (scripts/align_checks.py) runs every check; each test asserts one of them.
"""

import pytest

from conftest import assert_check, run_checks

CHECKS = [f"tp{tp}_{name}" for tp in (4, 2, 1)
          for name in ("pack_padding_changes_nothing", "gemm_inputs_pass_te_fp8_rule")] + [
    "tp4_sequence_only_padding_is_refused", "tp2_sequence_only_padding_is_refused",
    "tp_4_2_1_agree_with_pack_padding"]


@pytest.fixture(scope="module")
def checks():
    return run_checks("align_checks.py", timeout=240, nprocs=4)


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", CHECKS)
def test_alignment(checks, name):
    assert_check(checks, name)
