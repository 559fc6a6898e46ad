"""`s2lpo train` with the learner served by two SGLang-protocol replicas, synced over ONE update group.

One run (shared by the tests below, the tiny recipe): rollout.learner.backend=sglang with
replicas=2 launched by the trainer, sync.transport=distributed over gloo (one broadcast per bucket
reaches both), a parity check after every sync (rotating over the replicas). During step 2 one
replica is SIGKILLed while it serves rollouts: the engine resubmits its requests to the other,
restarts it, the next sync rebuilds the update group with the new process, and the run goes on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from megatron_s2lpo.trainer.metrics import read_metrics
from megatron_s2lpo.utils.ports import free_ports

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(REPO_ROOT / "examples" / "tiny_cpu.yaml")
NUM_STEPS = 3
PROMPTS, GROUP = 4, 4


def replica_state(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_test/state", timeout=5) as resp:
            return json.loads(resp.read())
    except OSError:
        return None


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("replicas")
    # Two ports from bind(0), not p and p + 1: Linux hands bind(0) odd ports and connect() even ones,
    # so p + 1 is where the trainer's own HTTP clients land while replica 0 loads.
    ports = free_ports(2)
    command = [sys.executable, "-m", "megatron_s2lpo.cli", "train", CONFIG, f"run.output_dir={out}",
               f"run.num_steps={NUM_STEPS}", "run.save_every=0", "run.eval_every=0", f"data.prompts_per_step={PROMPTS}",
               f"algo.group_size={GROUP}", "algo.t_mix=0", "rollout.learner.init_sft_steps=20",
               "rollout.learner.backend=sglang", "rollout.learner.replicas=2",
               f"rollout.learner.ports=[{ports[0]}, {ports[1]}]",
               f"rollout.learner.launch_command=[{sys.executable}, tests/protocol_server.py, --delay-s, '0.5']",
               "rollout.learner.startup_timeout_s=180", "rollout.learner.deterministic=true",
               # The stand-in takes GPU flags: the recipe's CPU profile refuses deterministic inference.
               'rollout.learner.profile=""',
               "sync.transport=distributed", "sync.group_backend=gloo", "sync.master_address=127.0.0.1",
               "sync.group_timeout_s=60", "sync.parity_every=1"]
    proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    killed = None
    try:
        deadline = time.monotonic() + 400
        while killed is None and proc.poll() is None and time.monotonic() < deadline:
            metrics = out / "metrics.jsonl"
            done = len(read_metrics(str(metrics))) if metrics.is_file() else 0
            st = replica_state(ports[1])
            if done == 1 and st is not None and st["inflight"]:  # replica 1 serving step 2's rollouts
                os.kill(st["pid"], signal.SIGKILL)
                killed = {"pid": st["pid"], "inflight": st["inflight"]}
            time.sleep(0.05)
        output, _ = proc.communicate(timeout=max(10, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output[-6000:]
    return {"out": out, "ports": ports, "killed": killed, "output": output}


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_three_steps_sync_both_replicas_with_parity_checks(run) -> None:
    records = read_metrics(str(run["out"] / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert r["weight_version"] == r["step"]
        assert r["parity/mean_abs_logp_diff"] < 1e-3  # fp32 engine and learner: identical weights
        assert r["rollout_tokens/learner"] > 0
    logs = sorted(p.name for p in (run["out"] / "logs").iterdir())
    assert logs == ["learner-0.log", "learner-1.log"]  # the servers' logs belong to the run


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_a_replica_killed_mid_step_loses_and_duplicates_nothing(run) -> None:
    assert run["killed"] is not None, "replica 1 was never caught serving step 2"
    records = read_metrics(str(run["out"] / "metrics.jsonl"))
    # Every step trained on all prompts x G samples: none lost (a missing one would have failed the
    # step), none doubled (the engine answers each request once; a doubled one would change the count).
    for r in records:
        assert r["G_s"] == GROUP and r["G_w"] == 0
    assert "exited" in run["output"] and "restarting (1/3)" in run["output"]
    log = (run["out"] / "logs" / "learner-1.log").read_text()
    assert log.count("==== start") == 2  # launched, then relaunched after the kill
    assert records[-1]["weight_version"] == NUM_STEPS  # the restarted replica got the later syncs
