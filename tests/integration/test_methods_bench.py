"""`benchmarks/methods_bench.py` end to end on one seed and a few steps: a finished comparison,
one extended by a method and killed mid-run, resumed, summarised (the statistics equal the runs'
own evaluations), and a changed setting refused. The figures themselves are not checked."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from process_control import kill_after_checkpoint, run_ok

from megatron_s2lpo.trainer.metrics import read_metrics

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "benchmarks" / "methods_bench.py"
NUM_STEPS = 4
SMALL = ["run.eval_every=1", "run.eval_num_samples=4", "data.synthetic.num_eval=8", "data.prompts_per_step=4",
         "algo.group_size=4", "algo.t_mix=3", "algo.mini_batches_per_step=1", "sync.parity_every=0",
         "rollout.learner.init_sft_steps=100", "rollout.explorer.init_sft_steps=5"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bench(out: Path, methods: str, *extra: str) -> list[str]:
    cmd = [sys.executable, str(SCRIPT), "--seeds", "1", "--steps", str(NUM_STEPS), "--k", "2",
           "--passk-splits", "heldout", "--report-steps", "2", "--methods", methods, "--out", str(out)]
    return cmd + [arg for o in SMALL for arg in ("--set", o)] + list(extra)


def evals(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["eval/avg_at_k"] for r in read_metrics(str(run_dir / "metrics.jsonl"))
            if r.get("eval/avg_at_k") is not None}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bench_runs_reuses_resumes_summarises_and_refuses(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "bench"
    seed_dir = out / "seed_1"
    proc = run_ok(bench(out, "grpo"), REPO_ROOT, timeout_s=400)
    assert "grpo: trained" in proc.stdout, proc.stdout
    grpo_log = (seed_dir / "grpo" / "metrics.jsonl").read_text()

    # a second method joins; the bench is SIGKILLed (with its trainer) after s2lpo's first checkpoint
    latest = seed_dir / "s2lpo" / "checkpoints" / "latest"
    kill_after_checkpoint(bench(out, "grpo,s2lpo"), REPO_ROOT, latest, what="s2lpo's first checkpoint",
                          timeout_s=400)
    checkpoint_step = int(latest.read_text().strip().split("_")[1])
    before = [r for r in read_metrics(str(seed_dir / "s2lpo" / "metrics.jsonl")) if r["step"] <= checkpoint_step]
    assert checkpoint_step < NUM_STEPS  # (the checkpoint's own metrics line may not be written yet)

    proc = run_ok(bench(out, "grpo,s2lpo"), REPO_ROOT, timeout_s=400)
    assert "grpo: reused" in proc.stdout and "s2lpo: resumed" in proc.stdout, proc.stdout
    assert (seed_dir / "grpo" / "metrics.jsonl").read_text() == grpo_log
    after = read_metrics(str(seed_dir / "s2lpo" / "metrics.jsonl"))
    assert [r["step"] for r in after] == list(range(NUM_STEPS + 1))
    assert after[:len(before)] == before  # nothing logged before the checkpoint was lost or rewritten

    # the summary is the runs' own evaluations
    summary = json.loads((out / "summary.json").read_text())
    acc = {m: evals(seed_dir / m) for m in ("grpo", "s2lpo")}
    assert sorted(acc["grpo"]) == list(range(NUM_STEPS + 1)) and acc["grpo"][0] == acc["s2lpo"][0]
    assert acc["grpo"][0] > 0  # the warm start answers some problems, so the sums below are not all 0
    for m in ("grpo", "s2lpo"):
        for step, value in acc[m].items():
            assert summary["curve"][m][str(step)]["mean"] == pytest.approx(value)
            assert math.isnan(summary["curve"][m][str(step)]["low"])  # one seed: no interval
        area = sum((acc[m][s] + acc[m][s + 1]) / 2 for s in range(NUM_STEPS)) / NUM_STEPS
        assert summary["auc"][m]["mean"] == pytest.approx(area)
    (pair,) = summary["pairs"]
    assert (pair["a"], pair["b"]) == ("s2lpo", "grpo")
    assert pair["steps"]["2"]["mean"] == pytest.approx(acc["s2lpo"][2] - acc["grpo"][2])
    assert summary["report_steps"] == [2, NUM_STEPS]
    curves = summary["passk"]["heldout"]
    assert len(curves["learner"]) == len(curves["explorer"]) == 2
    assert "| s2lpo - grpo |" in proc.stdout and "pass@k at initialisation, heldout" in proc.stdout
    for name in ("accuracy.png", "passk_init.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC

    # another setting for the same directories is refused and changes nothing
    proc = subprocess.run(bench(out, "grpo", "--set", "algo.clip_high=0.3"), cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "was started with other settings" in proc.stderr and "algo.clip_high: 0.28 -> 0.3" in proc.stderr
    assert (seed_dir / "grpo" / "metrics.jsonl").read_text() == grpo_log
