"""Mixture-of-experts learner (Qwen3-MoE) and context parallelism with real megatron-core: parity
with transformers, EP=2 = EP=1, routing replay, conversion and export across EP / TP / expert-TP
layouts, CP=2 = CP=1 for a MoE and a dense learner.

One 2-process launch (scripts/moe_cp_checks.py) runs every check; each test asserts one of them.
"""

import pytest

from conftest import assert_check, run_checks

CHECKS = [
    "ep2/export_equals_hf_state_dict",
    "ep2/logprobs_equal_transformers",
    "ep2/tool_writes_checkpoint",
    "ep2/r2_replays_the_old_log_prob_pass",
    "ep2/replay_own_routing_changes_nothing",
    "ep2/replay_other_experts_keeps_router_gradients",
    "ep2/replay_under_activation_recompute",
    "ep2_equals_ep1",
    "ep2_step_equals_ep1_step",
    "ep1/logits_equal_transformers",
    "tool_ep2_checkpoint_back_to_hf_at_ep1",
    "tp2_ep2_etp1/logits_and_export_equal_hf",
    "tp2_ep1_etp2/logits_and_export_equal_hf",
    "cp2_moe_equals_cp1",
    "cp2_dense_equals_cp1",
]


@pytest.fixture(scope="module")
def checks():
    return run_checks("moe_cp_checks.py", timeout=300)


@pytest.mark.distributed
@pytest.mark.timeout(360)
@pytest.mark.parametrize("name", CHECKS)
def test_moe_and_cp(checks, name):
    assert_check(checks, name)


ONE_PROCESS_CHECKS = [
    "ep1/export_equals_hf_state_dict",
    "ep1/logprobs_equal_transformers",
    "ep1/logits_equal_transformers",
    "ep1/tool_round_trip_bit_exact",
    "ep1/r2_replays_the_old_log_prob_pass",
    "ep1/replay_own_routing_changes_nothing",
    "ep1/replay_other_experts_keeps_router_gradients",
    "ep1/replay_under_activation_recompute",
    "ep1/step_moves_logprobs",
]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_one_process_mode_of_the_gpu_check():
    """The script's one-process mode, which tests/gpu/test_moe_cuda.py runs on one GPU, on gloo here."""
    checks = run_checks("moe_cp_checks.py", timeout=240, nprocs=1)
    assert sorted(checks) == sorted(ONE_PROCESS_CHECKS)
    for name in ONE_PROCESS_CHECKS:
        assert_check(checks, name)
