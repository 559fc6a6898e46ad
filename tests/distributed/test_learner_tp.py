"""TP=2 vs TP=1 on the same weights: vocab-parallel log-probs, micro-batch invariance, a GRPO step.

One 2-process launch (scripts/tp2_checks.py) runs every check; each test asserts one of them.
"""

import pytest

from conftest import assert_check, run_checks

CHECKS = [
    "tp2_vocab_parallel_matches_full_log_softmax",
    "tp2_micro_batch_invariance",
    "tp2_activation_recompute_same_gradients",
    "tp2_grpo_steps_decrease_loss",
    "tp2_logprobs_equal_tp1",
    "tp2_step_equals_tp1_dp2_step",
    "tp2_packed_equals_padded",
    "tp2_chunked_logprobs_equal_full_logits",
    "tp1_packed_equals_padded",
    "tp1_chunked_logprobs_equal_full_logits",
    "dp2_overlap_and_offload_continue_identically",
    "tp2_planner_within_25pct_of_measured_peak",
    "tp1_planner_within_25pct_of_measured_peak",
]


@pytest.fixture(scope="module")
def checks():
    return run_checks("tp2_checks.py", timeout=240)


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", CHECKS)
def test_tp2(checks, name):
    assert_check(checks, name)
