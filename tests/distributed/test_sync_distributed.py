"""Weight sync with real megatron-core learners (TP=2, TP=1 x DP=2, PP=2) into a LocalEngine and
into an SGLangEngine on the protocol test server, plus the parity check passing and failing.

One 2-process launch (scripts/sync_checks.py) runs every check; each test asserts one of them.
"""

import pytest

from conftest import assert_check, run_checks

CHECKS = [
    "sync_tp2_parity_fails_before_sync",
    "sync_tp2_disk_files_sync_and_parity",
    "sync_tp2_engine_logprobs_equal_learner",
    "sync_tp2_perturbed_engine_fails_parity",
    "sync_tp2_perturbed_learner_fails_parity",
    "sync_tp2_default_route_is_in_process_buckets",
    "sync_tp2_rank0_errors_reach_every_rank",
    "sync_tp2_http_disk_sync_and_parity",
    "sync_tp1_dp2_sync_and_logprobs",
    "sync_pp2_disk_sync_and_parity",
]


@pytest.fixture(scope="module")
def checks():
    return run_checks("sync_checks.py", timeout=240)


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", CHECKS)
def test_sync(checks, name):
    assert_check(checks, name)
