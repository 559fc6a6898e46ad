"""The tiny CPU recipe launched through NeMo-Run's LocalExecutor, its explorer on an SGLang-protocol
server: the run returns when the trainer ends and leaves no process behind.

Covers: `launch.build_local_experiment` -> NeMo-Run experiment -> one LocalExecutor task, the
supervisor (launch/supervisor.py), which starts the explorer's server (tests/protocol_server.py:
SGLang's native HTTP API, serving the explorer's tiny model in-process),
runs the trainer script (health gate, then `python -m megatron_s2lpo.cli train
examples/tiny_cpu.yaml ...` attached to the server's URL) and stops the server when the trainer
ends. Not covered here: Slurm and Docker executors
(their rendered scripts are checked in tests/unit/test_launch_*.py; the Slurm tier runs them) and
real SGLang (tests/real_sglang).
"""

import json
import os
import sys

import psutil
import pytest

run = pytest.importorskip("nemo_run", reason="nemo-run is not installed (pip install -e .)")

from megatron_s2lpo.trainer.build import build_tokenizer, materialize_model  # noqa: E402
from megatron_s2lpo.config import load_config  # noqa: E402
from megatron_s2lpo.launch.experiment import SUPERVISOR, build_local_experiment  # noqa: E402
from megatron_s2lpo.utils.ports import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "examples", "tiny_cpu.yaml")
PROTOCOL_SERVER = os.path.join(REPO, "tests", "protocol_server.py")


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
        except psutil.Error:
            continue
        if text in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE and proc.pid != os.getpid():
            found.append(f"{proc.pid}: {cmdline[:200]}")
    return found


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tiny_recipe_with_a_protocol_server_returns_and_leaves_nothing_running(tmp_path, monkeypatch):
    # NeMo-Run's packaging step may read stdin; pytest forbids it.
    monkeypatch.setattr("sys.stdin", open(os.devnull))
    out = tmp_path / "run"
    overrides = ["run.num_steps=2", f"run.output_dir={out}", "run.eval_every=0", "data.prompts_per_step=4",
                 "algo.group_size=4", "rollout.learner.init_sft_steps=5", "rollout.explorer.init_sft_steps=0"]
    # The server serves the explorer's model as the trainer would have written it: the trainer
    # reads its HF config (its FLOPs count) and scores fixed responses on it at start (the frozen
    # explorer's fingerprint), which a --noop server cannot answer.
    cfg = load_config(TINY, overrides)
    explorer_dir = materialize_model(cfg.rollout.explorer, "explorer", cfg, build_tokenizer(cfg))
    overrides += ["rollout.explorer.backend=sglang", f"rollout.explorer.model_path={explorer_dir}",
                  f"rollout.explorer.launch_command=[{sys.executable}, {PROTOCOL_SERVER}]"]
    exp, plan = build_local_experiment(TINY, tuple(overrides), base_dir=str(tmp_path / "nemo_home"),
                                       explorer_port=free_port())
    assert [s.name for s in plan.servers] == ["explorer_server"]
    with exp:
        exp.run()  # returns when the trainer has ended

    status = exp.status(return_dict=True)
    assert status[SUPERVISOR]["status"].name == "SUCCEEDED", status
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert [r["weight_version"] for r in records] == [1, 2]  # one weight sync per step
    assert records[0]["G_w"] > 0 and records[0]["rollout_tokens/explorer"] > 0  # the server generated
    assert (out / "checkpoints" / "latest").is_file()
    assert "ready in" in (out / "server_logs" / "explorer_server.log").read_text()  # the server's own log
    assert _processes_mentioning(str(tmp_path)) == []  # the server and the trainer are gone
