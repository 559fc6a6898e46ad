"""The tiny mixture-of-experts recipe through `s2lpo train` under 2 gloo ranks: EP=2 with rollout
routing replay (r3), the engine's routing carried by the learner's samples, parity after every sync."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from megatron_s2lpo.trainer.metrics import read_metrics
from launch import REPO_ROOT, run_distributed  # tests/distributed is on sys.path (conftest.py)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.mark.timeout(600)
def test_tiny_moe_recipe_trains_at_ep2_with_replay(tmp_path: Path) -> None:
    out = tmp_path / "moe"
    args = ("examples/tiny_moe_cpu.yaml", "run.num_steps=3", f"run.output_dir={out}", "data.prompts_per_step=4",
            "rollout.learner.init_sft_steps=5", "rollout.explorer.init_sft_steps=5", "algo.t_mix=2")
    outputs = run_distributed(REPO_ROOT / "tests" / "distributed" / "scripts" / "train_entry.py", nprocs=2,
                              timeout=540, args=args)
    assert "step 3/3" in outputs[0]
    records = read_metrics(str(out / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert r["weight_version"] == r["step"]
        assert r["parity/mean_abs_logp_diff"] < 0.05  # a bf16 engine against the fp32 EP=2 learner
    for r in records[1:]:  # steps with learner samples: routing came back and was replayed
        assert 0.5 < r["routing/overlap"] <= 1.0
        assert r["routing/mismatch_replayed"] <= 1.1 * r["routing/mismatch_free"] + 1e-5
        assert r["train/behaviour_mismatch"] == pytest.approx(r["routing/mismatch_replayed"], abs=1e-6)
    shutil.rmtree(out / "models")
