"""TP=2 vs TP=1: log-probs at the teacher's top-k ids from vocab-parallel logits, and their gradients;
log-probs under the engine's top-k / top-p truncation;
the learner's forward_kl / reverse_kl steps at TP=2 vs TP=1 x DP=2 from the same weights.

One 2-process launch (scripts/topk_checks.py) runs every check; each test asserts one of them.
Gloo on CPU; the NCCL path on GPUs runs the same code with another backend.
"""

import pytest

from conftest import assert_check, run_checks

CHECKS = [
    "topk_tp2_equals_tp1",
    "topk_tp2_rank_with_only_padding",
    "topk_tp2_forward_kl_gradient_equals_tp1",
    "truncated_logprobs_tp2_equal_tp1",
    "learner_forward_kl_tp2_equals_tp1_dp2",
    "learner_reverse_kl_tp2_equals_tp1_dp2",
]


@pytest.fixture(scope="module")
def checks():
    return run_checks("topk_checks.py", timeout=180)


@pytest.mark.distributed
@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", CHECKS)
def test_topk_tp2(checks, name):
    assert_check(checks, name)
