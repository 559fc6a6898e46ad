"""End to end on CPU with run.max_staleness=1 (trainer/pipeline.py): the next step's rollouts are
generated while the learner trains, the metrics say so, and a SIGKILLed run resumes exactly.

The same small recipe as test_train.py (real megatron learner, local engines, math-verify)."""

from __future__ import annotations

import shutil
import signal
import sys
from pathlib import Path

import pytest
from process_control import kill_after_checkpoint, run_ok, signal_after_lines, without_timing

from megatron_s2lpo.trainer.metrics import read_metrics
from megatron_s2lpo.trainer.pipeline import PENDING_FILE

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(REPO_ROOT / "examples" / "tiny_cpu.yaml")
NUM_STEPS = 5
OVERRIDES = ["run.num_steps=%d" % NUM_STEPS, "run.save_every=2", "run.eval_every=0", "run.max_staleness=1",
             "data.prompts_per_step=4", "data.synthetic.num_eval=4", "algo.group_size=4", "algo.t_mix=2",
             "sync.parity_every=2", "rollout.learner.init_sft_steps=20", "rollout.explorer.init_sft_steps=40"]


def command(output_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "megatron_s2lpo.cli", "train", CONFIG, *OVERRIDES,
            f"run.output_dir={output_dir}", *extra]


def run_train(output_dir: Path, *extra: str) -> None:
    run_ok(command(output_dir, *extra), REPO_ROOT, timeout_s=240)


@pytest.fixture(scope="module")
def ahead_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ahead")
    run_train(out)
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ahead_run_trains_one_version_behind_and_logs_the_pipeline(ahead_run: Path) -> None:
    records = read_metrics(str(ahead_run / "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(1, NUM_STEPS + 1))
    for r in records:
        assert r["weight_version"] == r["step"]
        for key in ("time/wait_rollout", "time/wait_train", "time/overlap", "time/rollout", "time/sync"):
            assert r[key] is not None, (r["step"], key)
        if r["G_s"]:  # the learner's samples: every step after the first is one version behind
            assert r["staleness/max"] == r["staleness/mean"] == (0 if r["step"] == 1 else 1), r["step"]
            assert 0 < r["train/is_weight_mean"] <= 2.0 and 0 <= r["train/is_clipped_frac"] <= 1, r["step"]
    ckpts = ahead_run / "checkpoints"
    assert (ckpts / "step_00000004" / PENDING_FILE).is_file()  # step 5's rollouts, collected during step 4
    assert not (ckpts / f"step_{NUM_STEPS:08d}" / PENDING_FILE).exists()  # nothing runs past the last step


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ahead_run_resumes_exactly_after_sigkill(ahead_run: Path, tmp_path: Path) -> None:
    """SIGKILL while step 4 trains (step 5 being generated; the newest checkpoint is step 2, with
    step 3's rollouts), `--resume` SIGKILLed right after its checkpoint of step 4, `--resume` to the
    end: the same batches and metrics as the uninterrupted run."""
    out = tmp_path / "killed"
    out.mkdir()
    shutil.copytree(ahead_run / "models", out / "models")
    latest = out / "checkpoints" / "latest"
    status, log = signal_after_lines(command(out), REPO_ROOT, out / "metrics.jsonl", num_lines=3,
                                     sig=signal.SIGKILL, timeout_s=240)
    assert status == -signal.SIGKILL, log[-4000:]
    assert latest.read_text().strip() == "step_00000002"
    kill_after_checkpoint(command(out, "--resume"), REPO_ROOT, latest, what="its next checkpoint", timeout_s=240,
                          after="step_00000002")
    assert latest.read_text().strip() == "step_00000004"
    run_train(out, "--resume")
    expected = [without_timing(r) for r in read_metrics(str(ahead_run / "metrics.jsonl"))]
    resumed = [without_timing(r) for r in read_metrics(str(out / "metrics.jsonl"))]
    assert [r["step"] for r in resumed] == list(range(1, NUM_STEPS + 1))
    for want, got in zip(expected, resumed):
        assert got == want, f"step {want['step']} differs after the kills"
