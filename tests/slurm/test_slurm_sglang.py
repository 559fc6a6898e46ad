"""The S2L-PO layout of the paper recipes on a real Slurm, shrunk to the tiny models, with REAL
SGLang 0.5.23 servers on CPU (the project's .venv-sglang, `profile: cpu`): the trainer, the
learner's server and the explorer's server each on an emulated node of its own (one
heterogeneous job), the servers behind the job's key; stopped by Slurm's own walltime signal,
and resumed by the chained job with fresh servers.
"""

from __future__ import annotations

import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from megatron_s2lpo.config import load_config
from megatron_s2lpo.trainer.metrics import read_metrics
from megatron_s2lpo.utils.ports import server_ports
from tests.slurm.jobs import (SMALL_BATCH, TINY, TINY_OVERRIDES, ResumeWatch, checkpoint_step, job_info, launch,
                              near_walltime, sbatch_log, signal_batch_shell, steps, stop_to_end_s, stopped_step,
                              wait_job, wait_no_processes, wait_steps)

# Two real servers loading (a core each) and the trainer, in two jobs: about 2 minutes of the
# tier on 2 cores (December 2026).
pytestmark = [pytest.mark.slow]

SIGNAL_LEAD_S = 240
NUM_STEPS = 500  # more than a job here trains: both jobs are stopped on request


def _tiny_models(root: Path) -> dict[str, str]:
    """The tiny recipe's learner and explorer as HF directories (the servers load them at start)."""
    from megatron_s2lpo.config.model import ModelArch
    from megatron_s2lpo.data.tokenizer import build_synthetic_tokenizer
    from megatron_s2lpo.rollout import LocalEngine

    cfg = load_config(TINY)
    tok = build_synthetic_tokenizer()
    out = {}
    for name in ("learner", "explorer"):
        engine = getattr(cfg.rollout, name)
        arch = engine.init_arch if isinstance(engine.init_arch, ModelArch) else ModelArch(**engine.init_arch)
        out[name] = str(root / name)
        LocalEngine.from_arch(arch, tokenizer=tok, init_seed=engine.init_seed).save_pretrained(out[name])
    return out


def _generate_status(url: str, key: str = "") -> int:
    """The HTTP status of a small /generate (with the key as a bearer token when given)."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(f"{url}/generate", method="POST", headers=headers,
                                     data=b'{"text": "1+1=", "sampling_params": {"max_new_tokens": 2}}')
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=60) as answer:
            return answer.status
    except urllib.error.HTTPError as err:
        return err.code


def _job_key_and_command_lines(*job_ids: str) -> tuple[set[str], list[str]]:
    """The job's key as its processes hold it (their environment: readable by their owner, here
    root) and every command line of the job's processes (readable by every user of the node)."""
    needles = [f"SLURM_JOB_ID={job_id}\0".encode() for job_id in job_ids]
    keys, command_lines = set(), []
    for entry in Path("/proc").iterdir():
        try:
            environ = (entry / "environ").read_bytes() if entry.name.isdigit() else b""
            if any(n in environ for n in needles):
                keys |= set(re.findall(rb"\0S2LPO_API_KEY=([0-9a-f]+)", b"\0" + environ))
                command_lines.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return {k.decode() for k in keys}, command_lines


@pytest.mark.timeout(1500)
def test_the_s2lpo_layout_with_real_sglang_servers_stops_on_the_walltime_and_resumes(slurm_cluster, tmp_path):
    from megatron_s2lpo.rollout.sglang_python import PROJECT_SGLANG_PYTHON, sglang_python

    python = sglang_python()
    if python != PROJECT_SGLANG_PYTHON and not os.environ.get("S2LPO_SGLANG_PYTHON"):
        pytest.fail(f"the S2L-PO layout needs {PROJECT_SGLANG_PYTHON} (`make install` builds it: tools/sglang_env.py) "
                    "or S2LPO_SGLANG_PYTHON naming another SGLang 0.5.23 interpreter")
    out = tmp_path / "run"
    models = _tiny_models(tmp_path / "models")
    ports = server_ports(3)  # below the ephemeral range: the servers bind late
    # half of every group from each server in every step, past any step this test reaches
    overrides = [*TINY_OVERRIDES, *SMALL_BATCH, "algo.schedule=constant", "algo.constant_share=0.5",
                 f"algo.t_mix={NUM_STEPS}", f"run.num_steps={NUM_STEPS}", f"run.output_dir={out}",
                 "sync.parity_every=5"]
    for name in ("learner", "explorer"):
        overrides += [f"rollout.{name}.backend=sglang", f"rollout.{name}.profile=cpu",
                      f"rollout.{name}.model_path={models[name]}", f"rollout.{name}.init_arch=null",
                      f"rollout.{name}.init_sft_steps=0"]
    submitted = time.monotonic()
    ids = launch(slurm_cluster, tmp_path, "--nodes", "3", "--time", "00:15:00", "--signal-lead", str(SIGNAL_LEAD_S),
                 "--max-chained-jobs", "1", "--sglang-python", python,
                 "--server-ports", ",".join(map(str, ports)), overrides=overrides)
    components = [str(int(ids[0]) + i) for i in range(3)]
    wait_steps(slurm_cluster, ids[0], out, 1, timeout_s=600)
    first_step_s = time.monotonic() - submitted
    # three components, three nodes
    infos = [job_info(slurm_cluster, c) for c in components]
    assert [c.get("HetJobOffset") for c in infos] == ["0", "1", "2"]
    assert len({c["NodeList"] for c in infos}) == 3, [c["NodeList"] for c in infos]
    # each server refuses a request without the job's key and serves one with it; the key is
    # in no command line of the job (`ps` shows those to every user of a node)
    keys, command_lines = _job_key_and_command_lines(*components)
    assert len(keys) == 1, keys
    key = keys.pop()
    for info, port in zip(infos[1:], ports):
        url = f"http://{info['NodeList']}:{port}"
        assert (_generate_status(url), _generate_status(url, key)) == (401, 200)
    assert any("sglang.launch_server" in c for c in command_lines)
    assert not any(key in c for c in command_lines), [c for c in command_lines if key in c]
    # Slurm's own walltime signal: the trainer checkpoints its step and the job ends
    wait_steps(slurm_cluster, ids[0], out, 2, timeout_s=600)
    near_walltime(slurm_cluster, ids[0], SIGNAL_LEAD_S)
    first = wait_job(slurm_cluster, ids[0], 300)
    stopped = steps(out)
    assert (first["JobState"], first["ExitCode"]) == ("COMPLETED", "0:0"), sbatch_log(first)[-3000:]
    assert "time limit near: asking the trainer to checkpoint and stop" in sbatch_log(first)
    assert 2 <= len(stopped) < NUM_STEPS and stopped_step(first, "SIGUSR1") == stopped[-1] == checkpoint_step(out)
    assert not wait_no_processes(*components)  # the servers went with the job
    # nor is the key in any script or log the job wrote (its shell runs under `set -x`)
    assert not [p for p in (tmp_path / "jobs").rglob("*") if p.is_file() and key in p.read_text(errors="replace")]
    # the chained job starts fresh servers and resumes; then it is asked to stop too
    resume = ResumeWatch(out, len(stopped))
    wait_steps(slurm_cluster, ids[1], out, len(stopped) + 2, timeout_s=600, on_poll=resume)
    signal_batch_shell(slurm_cluster, ids[1])
    second = wait_job(slurm_cluster, ids[1], 300)
    assert (second["JobState"], second["ExitCode"]) == ("COMPLETED", "0:0"), sbatch_log(second)[-3000:]
    records = read_metrics(str(out / "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(1, len(records) + 1)) and len(records) > len(stopped) + 1
    assert checkpoint_step(out) == len(records)
    assert all(r["G_w"] == 2 for r in records)  # both servers answered in every step of both jobs
    assert all(r["weight_version"] == r["step"] for r in records)  # every update reached the learner server
    print(f"\nslurm tier: S2L-PO with real SGLang servers: submission -> first step {first_step_s:.0f} s; Slurm's "
          f"walltime signal -> job end {stop_to_end_s(first):.0f} s after {len(stopped)} steps; job end -> the "
          f"chained job's first resumed step {resume.seconds_after(first):.0f} s (its servers started afresh)")
