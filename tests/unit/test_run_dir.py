"""Run directories: a new run never starts on a used one, `--resume` continues or refuses with what
it found, only an unused directory starts at step 1 (run_dir.check_run_dir, which `train()` and
the stage runner call before building anything)."""

import json
import os
import re
from pathlib import Path

import pytest
from test_learner_checkpoint_paths import _fake_checkpoint

from megatron_s2lpo.config import load_config
from megatron_s2lpo.trainer.run_dir import check_run_dir, run_traces

REPO = Path(__file__).resolve().parents[2]


def _trainer_checkpoint(root: Path, step: int) -> Path:
    """A checkpoint as the trainer saves one: its trainer state holds the sampler and counters."""
    path = _fake_checkpoint(root, step)
    state = {"step": step, "sampler": {"epoch": 0, "position": 4 * step}, "cumulative": {}}
    (path / "trainer_state.json").write_text(json.dumps({"step": step, "trainer_state": state}))
    return path


def _metrics(out: Path, steps) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward/all": 0.5}) + "\n" for s in steps))


def test_an_unused_directory_starts_at_step_1_with_or_without_resume(tmp_path):
    assert check_run_dir(tmp_path / "new", resume=False) is False
    (tmp_path / "cached" / "models" / "learner").mkdir(parents=True)  # a cached model is no run
    (tmp_path / "cached" / "metrics.jsonl").write_text("\n")
    for resume in (False, True):
        assert check_run_dir(tmp_path / "cached", resume=resume) is False


@pytest.mark.parametrize("leave", ["a step directory", "an unfinished save", "metrics only"])
def test_a_new_run_refuses_a_used_directory_even_without_latest(tmp_path, leave):
    out = tmp_path / "run"
    if leave == "a step directory":
        _fake_checkpoint(out / "checkpoints", 4)  # no `latest`: the pointer was removed
        expected = "checkpoints/step_00000004"
    elif leave == "an unfinished save":
        (out / "checkpoints" / ".tmp-step_00000002" / "dist").mkdir(parents=True)
        expected = "checkpoints/.tmp-step_00000002 (an unfinished save)"
    else:
        _metrics(out, [1, 2, 3])
        expected = "metrics.jsonl with 3 record(s), steps 1-3"
    with pytest.raises(ValueError, match=rf"already holds a run \(.*{re.escape(expected)}.*\); pass --resume"):
        check_run_dir(out, resume=False)


def test_resume_without_a_loadable_checkpoint_refuses_and_changes_nothing(tmp_path):
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    for step in (2, 4):
        _trainer_checkpoint(ckpts, step)
    (ckpts / "latest").write_text("step_00000004\n")
    _metrics(out, range(1, 6))
    assert check_run_dir(out, resume=True) is True  # continues from step 4
    for step in (2, 4):
        os.remove(ckpts / f"step_{step:08d}" / "COMPLETE")  # every COMPLETE marker gone
    (ckpts / "step_00000006").mkdir()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"--resume: .* holds a run but no checkpoint that can be loaded.*Found: "
                                         r"metrics.jsonl with 5 record\(s\), steps 1-5; checkpoints/latest; "
                                         r"checkpoints/step_00000002; checkpoints/step_00000004; "
                                         r"checkpoints/step_00000006"):
        check_run_dir(out, resume=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # a damaged checkpoint is listed with the reason it cannot be loaded
    (ckpts / "step_00000004" / "COMPLETE").write_text("")
    (ckpts / "step_00000004" / "trainer_state.json").write_text("{")
    with pytest.raises(ValueError, match=r"step_00000004 cannot be loaded: .*trainer_state.json: does not parse"):
        check_run_dir(out, resume=True)
    _metrics(tmp_path / "metrics_only", [1, 2])  # killed before its first checkpoint
    with pytest.raises(ValueError, match="no checkpoint that can be loaded"):
        check_run_dir(tmp_path / "metrics_only", resume=True)


def test_a_staged_run_refuses_a_used_stage_directory_before_writing_anything(tmp_path):
    from megatron_s2lpo.trainer.stages import run_stages

    cfg = load_config(str(REPO / "examples" / "tiny_bridge_cpu.yaml"), [f"run.output_dir={tmp_path}"])
    _metrics(tmp_path / "stages" / "02-warmup", [1, 2])  # stages.json is gone, the stage's results are not
    with pytest.raises(ValueError, match=r"already holds a staged run \(.*02-warmup: metrics.jsonl with 2 record"):
        run_stages(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stages"]
    assert run_traces(tmp_path / "stages" / "01-teacher_grpo") == []
