"""End to end on CPU: `s2lpo train` with real components (megatron learner, local engines,
math-verify), exact resume after SIGKILL, `s2lpo eval` and `s2lpo explore`.

The runs share one pair of tiny models (built and warm-started once, then copied into each
run's output directory) to keep the tier short.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from process_control import kill_after_checkpoint, run_ok, signal_after_lines, without_timing

from megatron_s2lpo.algo.schedule import schedule_share, split_group
from megatron_s2lpo.trainer.metrics import read_metrics
from megatron_s2lpo.trainer.stop_signal import CONTINUE_EXIT_CODE

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(REPO_ROOT / "examples" / "tiny_cpu.yaml")
NUM_STEPS = 5
# Small and quick: 4 prompts x G=4, short completions, eval and parity every other step.
OVERRIDES = ["run.num_steps=%d" % NUM_STEPS, "run.save_every=2", "run.eval_every=2", "run.eval_num_samples=2",
             "data.prompts_per_step=4", "data.synthetic.num_eval=4", "algo.group_size=4", "algo.t_mix=4",
             "sync.parity_every=2", "rollout.learner.init_sft_steps=20", "rollout.explorer.init_sft_steps=40"]
PER_SOURCE = ("reward", "accuracy", "response_len", "share", "advantage", "logp_mismatch", "rollout_tokens",
              "rollout_flops", "cumulative/rollout_tokens", "cumulative/rollout_flops")
GLOBAL = ("alpha", "G_w", "G_s", "entropy", "train/clip_frac", "train/grad_norm", "train/ppo_kl",
          "weight_version", "time/rollout", "time/reward", "time/old_logprob", "time/train", "time/sync",
          "time/eval", "time/checkpoint", "time/other", "time/step")


def command(output_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "megatron_s2lpo.cli", "train", CONFIG, *OVERRIDES,
            f"run.output_dir={output_dir}", *extra]


def run_train(output_dir: Path, *extra: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return run_ok(command(output_dir, *extra), REPO_ROOT, timeout_s=timeout)


def copy_models(src: Path, dst: Path) -> None:
    shutil.copytree(src / "models", dst / "models")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full")
    run_train(out)
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_train_writes_every_metric_per_step(full_run: Path) -> None:
    records = read_metrics(str(full_run / "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(1, NUM_STEPS + 1))
    for r in records:
        missing = [k for k in GLOBAL if k not in r]
        missing += [f"{m}/{s}" for m in PER_SOURCE for s in ("explorer", "learner") if f"{m}/{s}" not in r]
        assert not missing, missing
        step = r["step"]
        assert (r["G_w"], r["G_s"]) == split_group(step, 4, 4)
        assert r["alpha"] == pytest.approx(schedule_share(step, 4))
        assert r["share/explorer"] == pytest.approx(r["G_w"] / 4)
        assert r["weight_version"] == step  # the learner's engine got the weights of every step
    assert "eval/avg_at_k" in records[1] and "eval/avg_at_k" not in records[0]
    assert "parity/mean_abs_logp_diff" in records[1]
    assert records[1]["parity/mean_abs_logp_diff"] < 1e-3
    # cumulative counters add up the per-step ones
    total = sum(r["rollout_tokens/learner"] for r in records)
    assert records[-1]["cumulative/rollout_tokens/learner"] == pytest.approx(total)
    assert (full_run / "checkpoints" / "latest").read_text().strip() == f"step_{NUM_STEPS:08d}"


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_resume_after_sigusr1_and_after_sigkill_is_exact(full_run: Path, tmp_path: Path) -> None:
    """One run stopped twice, each resume continuing exactly as the uninterrupted run did:

    1. SIGUSR1 (a cluster's "time is nearly up") while step 3 runs: the trainer finishes step 3,
       checkpoints it although run.save_every=2 would not, and exits with the "continue" status;
    2. `--resume`, SIGKILLed right after its next checkpoint (step 4);
    3. `--resume` to the end.
    """
    out = tmp_path / "stopped"
    out.mkdir()
    copy_models(full_run, out)
    latest = out / "checkpoints" / "latest"
    status, log = signal_after_lines(command(out), REPO_ROOT, out / "metrics.jsonl", num_lines=2,
                                     sig=signal.SIGUSR1, timeout_s=240)
    assert status == CONTINUE_EXIT_CODE, log[-4000:]
    assert "SIGUSR1: finishing the current step" in log and "stopped on SIGUSR1 after step 3" in log
    assert latest.read_text().strip() == "step_00000003"
    assert [r["step"] for r in read_metrics(str(out / "metrics.jsonl"))] == [1, 2, 3]
    # SIGKILL of the trainer alone: its reward workers, any checkpoint helper and resource tracker die too
    survivors = kill_after_checkpoint(command(out, "--resume"), REPO_ROOT, latest, what="its next checkpoint",
                                      timeout_s=240, after="step_00000003", trainer_only=True)
    assert not survivors, f"processes outlived the SIGKILLed trainer: {survivors}"
    killed_at = int(latest.read_text().strip().split("_")[1])
    assert 3 < killed_at < NUM_STEPS
    run_train(out, "--resume")
    expected = [without_timing(r) for r in read_metrics(str(full_run / "metrics.jsonl"))]
    resumed = [without_timing(r) for r in read_metrics(str(out / "metrics.jsonl"))]
    assert [r["step"] for r in resumed] == list(range(1, NUM_STEPS + 1))
    for want, got in zip(expected, resumed):
        assert got == want, f"step {want['step']} differs after stopping at step 3 and at step {killed_at}"


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_resume_logs_a_step_killed_between_its_checkpoint_and_its_metrics(full_run: Path, tmp_path: Path) -> None:
    """The run's state just after step 4's checkpoint committed and before its metrics line was
    written (rebuilt from the full run: step 5's checkpoint and lines 4-5 removed). The resume
    logs step 4 from the checkpoint and step 5 afresh; none is lost or repeated."""
    out = tmp_path / "cut"
    shutil.copytree(full_run, out)
    ckpts = out / "checkpoints"
    shutil.rmtree(ckpts / f"step_{NUM_STEPS:08d}")
    (ckpts / "latest").write_text(f"step_{NUM_STEPS - 1:08d}\n")
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(lines[:NUM_STEPS - 2]))
    run_train(out, "--resume")
    expected = read_metrics(str(full_run / "metrics.jsonl"))
    resumed = read_metrics(str(out / "metrics.jsonl"))
    assert [r["step"] for r in resumed] == list(range(1, NUM_STEPS + 1))
    for want, got in zip(expected, resumed):
        assert without_timing(got) == without_timing(want), f"step {want['step']} differs"
    recovered = resumed[NUM_STEPS - 2]
    assert "time/checkpoint" not in recovered and "time/step" not in recovered  # measured after the save
    assert recovered["time/train"] == expected[NUM_STEPS - 2]["time/train"]  # the killed run's own timings


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_eval_writes_monotone_passk_csv(full_run: Path, tmp_path: Path) -> None:
    models = [str(full_run / "models" / "explorer"), str(full_run / "models" / "learner")]
    proc = subprocess.run([sys.executable, "-m", "megatron_s2lpo.cli", "eval", CONFIG, *OVERRIDES,
                           f"run.output_dir={full_run}", "--models", *models, "--k", "4", "--out", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-5000:]
    with open(tmp_path / "passk.csv") as f:
        rows = list(csv.DictReader(f))
    for model in models:
        curve = [float(r["pass_at_k"]) for r in rows if r["model"] == os.path.normpath(model)]
        assert len(curve) == 4
        assert all(a <= b + 1e-12 for a, b in zip(curve, curve[1:])), curve
        avg = {float(r["avg_at_k_pass1"]) for r in rows if r["model"] == os.path.normpath(model)}
        assert len(avg) == 1 and avg.pop() == pytest.approx(curve[0], abs=1e-6)  # avg@k Pass@1 = pass@1
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "passk.png").is_file()


@pytest.mark.timeout(120)
def test_train_rejects_an_unknown_field(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "megatron_s2lpo.cli", "train", CONFIG, "algo.tmix=3",
                           f"run.output_dir={tmp_path}"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 2
    assert "algo.t_mix" in proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_explore_then_train_from_the_store_with_pods_kl_and_behaviour_mode(full_run: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    # 8 train prompts, 4 per step: step 3 revisits prompts of steps 1-2, whose first 6 store samples
    # are used, so it takes samples 6-7: a resumed run must restore the store cursor to match.
    variant = [f"rollout.explorer_store={store}", "data.synthetic.num_train=8", "run.num_steps=3", "run.eval_every=0", "algo.pods.n=6",
               "algo.pods.m=4", "algo.kl_coef=0.01", "algo.old_logprob=behaviour", "algo.ppo_epochs=2",
               "algo.mini_batches_per_step=2"]
    base = [sys.executable, "-m", "megatron_s2lpo.cli"]

    def run(out: Path, *extra: str) -> None:
        proc = subprocess.run(base + ["train", CONFIG, *OVERRIDES, *variant, f"run.output_dir={out}", *extra],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-5000:]

    proc = subprocess.run(base + ["explore", CONFIG, *OVERRIDES, *variant, f"run.output_dir={full_run}",
                                  "--num-samples", "8"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "8 prompts x 8 samples" in proc.stdout and any(store.iterdir())
    whole, split = tmp_path / "whole", tmp_path / "split"
    for out in (whole, split):
        out.mkdir()
        copy_models(full_run, out)
    run(whole)
    run(split, "run.num_steps=2")
    run(split, "run.num_steps=3", "--resume")  # the store cursor and sampler continue from step 2
    records = read_metrics(str(whole / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert (r["G_w"], r["G_s"]) == split_group(r["step"], 6, 4)  # the schedule splits the n generated
        assert r["share/explorer"] + r["share/learner"] == pytest.approx(1.0)
        assert r["rollout_tokens/explorer"] > 0
        assert "train/kl" in r and "train/is_weight_mean" in r
    resumed = read_metrics(str(split / "metrics.jsonl"))
    assert [without_timing(r) for r in resumed] == [without_timing(r) for r in records]


@pytest.mark.timeout(200)
def test_a_used_run_directory_is_never_started_over(full_run: Path, tmp_path: Path) -> None:
    proc = subprocess.run(command(full_run), cwd=REPO_ROOT, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 2
    assert "--resume" in proc.stderr
    out = tmp_path / "used"
    shutil.copytree(full_run, out)
    ckpts = out / "checkpoints"
    (ckpts / "latest").unlink()  # the pointer alone is gone: the step directories still count
    proc = subprocess.run(command(out), cwd=REPO_ROOT, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr and "step_00000004" in proc.stderr
    for marker in ckpts.glob("step_*/COMPLETE"):  # no checkpoint is complete any more
        marker.unlink()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = subprocess.run(command(out, "--resume"), cwd=REPO_ROOT, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 2 and "no checkpoint that can be loaded" in proc.stderr, proc.stderr[-3000:]
    assert f"metrics.jsonl with {NUM_STEPS} record(s), steps 1-{NUM_STEPS}" in proc.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing truncated or rewritten


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_resume_refuses_an_explorer_whose_weights_changed(full_run: Path, tmp_path: Path) -> None:
    """The explorer's model directory now holds other weights (a frozen server relaunched from a
    replaced checkpoint): the fingerprint of the first start (rollout/frozen.py) stops the resume."""
    import torch

    from megatron_s2lpo.rollout.local import LocalEngine

    out = tmp_path / "changed"
    shutil.copytree(full_run, out)
    assert (out / "frozen_fingerprints.json").is_file()
    explorer = out / "models" / "explorer"
    engine = LocalEngine.from_pretrained(str(explorer))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in engine.model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
    shutil.rmtree(explorer)
    engine.save_pretrained(str(explorer))
    proc = subprocess.run(command(out, "--resume"), cwd=REPO_ROOT, capture_output=True, text=True, timeout=200)
    assert proc.returncode != 0
    assert "FrozenWeightsError" in proc.stderr and "frozen explorer engine" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_fp8_learner_engine_shows_its_mismatch_and_icepop_masks_it(full_run: Path, tmp_path: Path) -> None:
    """The injected engine/learner mismatch is real FP8 rounding: the learner's in-process engine
    runs with `--quantization fp8` (block-FP8 weights, written once to models/learner-fp8 and
    pushed quantized by every sync) while the learner trains in fp32. The mismatch statistics of
    the learner's rows move from the exact engine's ratio of 1 (full_run) to FP8's gap, and the
    icepop band [0.99, 1.01] masks the tokens outside it, as train/is_clipped_frac counts them."""
    from megatron_s2lpo.convert.fp8 import Fp8Format

    out = tmp_path / "fp8"
    out.mkdir()
    copy_models(full_run, out)
    run_train(out, "run.num_steps=2", "run.eval_every=0", "algo.t_mix=0", "rollout.learner.extra_args=[--quantization, fp8]",
              "algo.precision_correction=true", "algo.is_threshold=1.01", "algo.mismatch.correction=icepop",
              "algo.mismatch.low=0.99", "sync.parity_threshold=0.05", "sync.parity_every=1")
    assert Fp8Format.from_model_dir(str(out / "models" / "learner-fp8")) == Fp8Format()
    # the steps of full_run whose batch has learner rows (early steps may be all explorer)
    exact = [r for r in read_metrics(str(full_run / "metrics.jsonl")) if "mismatch/learner/abs_log_ratio" in r]
    fp8 = read_metrics(str(out / "metrics.jsonl"))
    assert len(exact) >= 2
    assert [r["step"] for r in fp8] == [1, 2] and [r["weight_version"] for r in fp8] == [1, 2]
    for r in exact:  # the fp32 engine samples with the learner's weights: no correction, ratio 1
        assert r["mismatch/learner/abs_log_ratio"] < 1e-5 and abs(r["mismatch/learner/ratio_max"] - 1) < 1e-4
        assert "mismatch/learner/masked_frac" not in r and "train/is_weight_mean" not in r
    for r in fp8:
        assert 1e-3 < r["mismatch/learner/abs_log_ratio"] < 0.05 and r["mismatch/learner/k3_kl"] > 1e-6
        assert r["mismatch/learner/ratio_min"] < 0.99 and r["mismatch/learner/ratio_max"] > 1.01  # FP8's spread
        masked = r["mismatch/learner/masked_frac"]
        assert 0.01 < masked < 0.9 and r["mismatch/learner/truncated_frac"] == 0  # icepop zeroes, never caps
        assert r["train/is_clipped_frac"] == pytest.approx(masked) and r["train/is_weight_mean"] < 1
        assert r["parity/mean_abs_logp_diff"] < 0.05  # the parity check compares with the FP8 engine
