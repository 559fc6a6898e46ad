"""The trainer under 2 gloo ranks (TP=2): rank 0 drives the engines and rewards and broadcasts
the scored groups (with dynamic sampling on: over rounds that only rank 0 draws prompts for, its
sampler state going to every rank with them); both ranks train; the synced engine matches the
sharded learner."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from megatron_s2lpo.trainer.metrics import read_metrics
from launch import REPO_ROOT, run_distributed  # tests/distributed is on sys.path (conftest.py)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.mark.timeout(400)
def test_train_tp2_runs_and_syncs(tmp_path: Path) -> None:
    out = tmp_path / "tp2"
    args = ("examples/tiny_cpu.yaml", "run.num_steps=2", f"run.output_dir={out}", "learner.tensor_parallel_size=2",
            "data.prompts_per_step=4", "algo.group_size=4", "algo.t_mix=2", "sync.parity_every=1",
            "rollout.learner.init_sft_steps=5", "rollout.explorer.init_sft_steps=5", "run.eval_every=0",
            "algo.dynamic_sampling.enabled=true", "algo.dynamic_sampling.max_rounds=2")
    outputs = run_distributed(REPO_ROOT / "tests" / "distributed" / "scripts" / "train_entry.py", nprocs=2, timeout=360, args=args)
    assert "step 2/2" in outputs[0] and "step 2/2" not in outputs[1]  # rank 0 reports
    records = read_metrics(str(out / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2]
    assert [(r["G_w"], r["G_s"]) for r in records] == [(4, 0), (0, 4)]
    for r in records:
        assert r["dynamic/rounds"] >= 1 and r["dynamic/groups_generated"] == 4 * r["dynamic/rounds"]
        assert r["weight_version"] == r["step"]
        assert r["parity/mean_abs_logp_diff"] < 1e-3  # the TP=2 learner's weights reached the engine
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    shutil.rmtree(out / "models")
