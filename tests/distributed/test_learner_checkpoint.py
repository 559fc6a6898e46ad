"""Checkpoints (atomic save, identical resume, interrupted save, resharding) and the reference model.

One 2-process launch (scripts/ckpt_checks.py) runs every check; each test asserts one of them.
"""

import pytest

from conftest import SCRIPTS, assert_check, run_checks

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
    "dp_reshardable_save_gathers_nothing",
    "async_save_resumes_identically",
    "async_write_failure_keeps_previous_checkpoint",
    "dp_reshardable_checkpoint_refuses_another_tp_clearly",
]


@pytest.fixture(scope="module")
def checks():
    return run_checks("ckpt_checks.py", timeout=240)


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", CHECKS)
def test_checkpoint(checks, name):
    assert_check(checks, name)


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_kill_during_async_save_falls_back_to_the_previous_checkpoint(tmp_path):
    """Both ranks SIGKILLed while step 3's asynchronous save is being written: the root still
    resolves to step 1 (committed), the half-written step is an ignored `.tmp-*` directory, and
    step 1's dp_reshardable state resumes at DP=1 to the loss the killed DP=2 run computed."""
    import json

    import psutil
    from launch import DistributedRunError, run_distributed

    from megatron_s2lpo.learner import checkpoint as ckpt

    root = tmp_path / "checkpoints"
    with pytest.raises(DistributedRunError) as killed:
        run_distributed(SCRIPTS / "ckpt_async_kill.py", nprocs=2, timeout=120, args=(str(root), "kill"))
    output = str(killed.value)
    writers = [pid for line in output.splitlines() if line.startswith("WRITERS ")
               for pid in json.loads(line[len("WRITERS "):])]
    reference = next(json.loads(line[len("REFERENCE "):]) for line in output.splitlines()
                     if line.startswith("REFERENCE "))
    assert writers and "exit code -9" in output, output[-3000:]
    for pid in writers:  # the orphaned writers of the killed ranks and their shard writers (still sleeping)
        try:
            writer = psutil.Process(pid)
            for process in writer.children(recursive=True) + [writer]:
                process.kill()
        except psutil.NoSuchProcess:
            pass
    assert (root / "latest").read_text().strip() == "step_00000001"
    assert (root / ".tmp-step_00000003").is_dir() and not (root / "step_00000003").exists()
    assert ckpt.latest_checkpoint(root) == root / "step_00000001"
    [out] = run_distributed(SCRIPTS / "ckpt_async_kill.py", nprocs=1, timeout=120, args=(str(root), "resume"))
    resumed = next(json.loads(line[len("RESUMED "):]) for line in out.splitlines() if line.startswith("RESUMED "))
    assert resumed["step"] == 1 and resumed["path"].endswith("step_00000001")
    assert abs(resumed["loss"] - reference["loss"]) < 1e-6
