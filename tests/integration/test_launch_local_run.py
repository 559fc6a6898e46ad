"""The tiny CPU recipe launched through NeMo-Run's LocalExecutor runs to completion.

Covers: `launch.build_local_experiment` -> NeMo-Run experiment -> a LocalExecutor task that runs
`python -m megatron_s2lpo.cli train examples/tiny_cpu.yaml ...` in its own process, with the
metrics and the final checkpoint written where the config says. Not covered here: Slurm and
Docker executors (their rendered scripts are checked in tests/unit/test_launch_*.py) and
SGLang server tasks (GPU only).
"""

import json
import os

import pytest

run = pytest.importorskip("nemo_run", reason="nemo-run is not installed (pip install -e .)")

from megatron_s2lpo.launch.experiment import build_local_experiment  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "examples", "tiny_cpu.yaml")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tiny_cpu_recipe_runs_through_local_executor(tmp_path, monkeypatch):
    # NeMo-Run's packaging step may read stdin; pytest forbids it.
    monkeypatch.setattr("sys.stdin", open(os.devnull))
    out = tmp_path / "run"
    overrides = ("run.num_steps=2", f"run.output_dir={out}", "run.eval_every=0",
                 "rollout.learner.init_sft_steps=5", "rollout.explorer.init_sft_steps=5")
    exp, plan = build_local_experiment(TINY, overrides, base_dir=str(tmp_path / "nemo_home"))
    assert plan.servers == []
    with exp:
        exp.run(sequential=False)

    status = exp.status(return_dict=True)
    assert status["trainer"]["status"].name == "SUCCEEDED", status
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert [r["weight_version"] for r in records] == [1, 2]  # one weight sync per step
    assert (out / "checkpoints" / "latest").is_file()
