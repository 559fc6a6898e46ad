"""`examples/s2lpo_demo.py`: a shortened demo end to end (both runs, step-0 eval, table, PNG),
and its table arithmetic against hand-computed records."""

from __future__ import annotations

import csv
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_s2lpo.trainer.metrics import read_metrics

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "examples" / "s2lpo_demo.py"
NUM_STEPS = 4
SHORT = ["run.eval_every=2", "run.eval_num_samples=2", "run.save_every=0", "data.synthetic.num_eval=4",
         "data.prompts_per_step=4", "algo.group_size=4", "algo.t_mix=3", "algo.mini_batches_per_step=1",
         "rollout.learner.init_sft_steps=5", "rollout.explorer.init_sft_steps=5"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load_demo():
    spec = importlib.util.spec_from_file_location("s2lpo_demo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(300)
def test_short_demo_prints_table_and_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    demo = load_demo()
    cmd = [sys.executable, str(SCRIPT), "--steps", str(NUM_STEPS), "--out", str(tmp_path)]
    cmd += [arg for o in SHORT for arg in ("--set", o)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split() == list(demo.COLUMNS))
    rows = [line.split() for line in lines[header + 1:header + 4]]
    assert [int(r[0]) for r in rows] == [0, 2, 4]
    assert all(len(r) == len(demo.COLUMNS) for r in rows), rows
    # the table's accuracies are the runs' own eval records
    for name, col in (("s2lpo", 5), ("grpo", 6)):
        evals = {r["step"]: r["eval/avg_at_k"] for r in read_metrics(str(tmp_path / name / "metrics.jsonl"))
                 if r.get("eval/avg_at_k") is not None}
        assert sorted(evals) == [2, 4]
        for r in rows[1:]:
            assert float(r[col]) == pytest.approx(evals[int(r[0])], abs=5e-4)
    assert rows[1][2] == "2/2"  # step 2 of t_mix=3, G=4: alpha=0.5
    assert 0.0 <= float(rows[2][7]) < 1.0
    assert any(line.startswith("held-out accuracy") for line in lines)
    png = (tmp_path / "accuracy.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 1000
    with open(tmp_path / "table.csv") as f:
        table = list(csv.reader(f))
    assert table[0] == list(demo.COLUMNS) and len(table) == 4
    # GRPO never builds the explorer; S2L-PO's warm starts are cached for the next demo
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["explorer", "learner", "warm_start.json"]


def record(step, *, alpha=0.5, g=(2, 2), rexp=1.0, rlearn=0.0, other=0.1, total=1.0, acc=None):
    r = {"step": step, "alpha": alpha, "G_w": g[0], "G_s": g[1], "reward/explorer": rexp,
         "reward/learner": rlearn, "time/other": other, "time/step": total}
    if acc is not None:
        r["eval/avg_at_k"] = acc
    return r


def test_build_table_averages_since_previous_row():
    demo = load_demo()
    s2lpo = [record(1, rexp=1.0, rlearn=0.0, other=0.1, total=1.0),
             record(2, rexp=0.5, rlearn=0.5, other=0.3, total=1.0, acc=0.25),
             record(3, alpha=0.0, g=(0, 4), rexp=None, rlearn=1.0, other=0.0, total=2.0),
             record(4, alpha=0.0, g=(0, 4), rexp=None, rlearn=0.0, other=1.0, total=2.0, acc=0.5)]
    grpo = [{"step": 2, "eval/avg_at_k": 0.125}, {"step": 4, "eval/avg_at_k": 0.0}]
    rows = demo.build_table(s2lpo, grpo, acc0=0.1, save_every=0, num_steps=4)
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert rows[0]["acc_s2lpo"] == rows[0]["acc_grpo"] == 0.1
    assert rows[1]["reward_explorer"] == pytest.approx(0.75) and rows[1]["reward_learner"] == pytest.approx(0.25)
    assert rows[1]["other_share"] == pytest.approx(0.1) and rows[1]["G"] == "2/2"  # step 2 evaluates
    assert math.isnan(rows[2]["reward_explorer"])  # no explorer samples after t_mix
    assert rows[2]["reward_learner"] == pytest.approx(0.5) and rows[2]["other_share"] == pytest.approx(0.0)
    plain = demo.plain_steps(s2lpo + [record(5), record(6, other=0.5)], save_every=3, num_steps=6)
    assert [r["step"] for r in plain] == [1, 5]  # 2, 4 evaluate; 3 saves; 6 is the last step
    assert (rows[1]["acc_s2lpo"], rows[1]["acc_grpo"], rows[2]["acc_grpo"]) == (0.25, 0.125, 0.0)
