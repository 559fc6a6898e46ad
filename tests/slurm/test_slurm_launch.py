"""The cluster launch on a real Slurm (three emulated nodes, no containers), submitted by NeMo-Run.

Every job here is submitted as a user would: `examples/launch.py --executor slurm --venv ...`
(NeMo-Run's SlurmExecutor and its sbatch), on the tiny CPU recipe. What is checked is what
Slurm did: job states, exit codes, restarts, the trainer's checkpoints and metrics.

Timing: Slurm's controller looks at time limits (and so sends `--signal`) every 30 s, so a job
that must be stopped mid-run by its walltime signal trains for at least that long after the
test shortens its limit (near_walltime).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from megatron_s2lpo.learner.checkpoint import STATE_FILE, latest_checkpoint
from megatron_s2lpo.trainer.metrics import read_metrics
from megatron_s2lpo.trainer.run_dir import CHECKPOINT_SUBDIR
from megatron_s2lpo.config import load_config
from megatron_s2lpo.utils.ports import free_port, free_ports
from tests.integration.process_control import without_timing

pytestmark = [pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable  # this checkout's environment: the job runs in it (--venv)
VENV = str(Path(sys.prefix))
TINY = str(REPO / "examples" / "tiny_cpu.yaml")
# The tiny recipe with a short warm start and no evaluation: about 0.4 s per step on 2 cores.
TINY_OVERRIDES = ["run.eval_every=0", "rollout.learner.init_sft_steps=20", "rollout.explorer.init_sft_steps=40",
                  "run.save_every=1000"]
TERMINAL = {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE"}


def launch(cluster, tmp_path: Path, *args: str, overrides: list[str], timeout_s: float = 120) -> list[str]:
    """`examples/launch.py --executor slurm` as a user types it; returns the submitted job ids."""
    nodes = [] if "--nodes" in args else ["--nodes", "1"]
    command = [PYTHON, str(REPO / "examples" / "launch.py"), "--recipe", TINY, "--executor", "slurm", *nodes,
               "--account", "s2lpo", "--partition", "batch", "--gpus-per-node", "0", "--venv", VENV,
               "--job-dir", str(tmp_path / "jobs"), *args, *overrides]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=tmp_path,
                          env={**os.environ, **cluster.env}, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "UNKNOWN" not in proc.stdout + proc.stderr  # no sacct status without accounting
    match = re.search(r"submitted job\(s\) ([\d ]+) \(", proc.stdout)
    assert match, proc.stdout[-2000:]
    return match.group(1).split()


def job_info(cluster, job_id: str) -> dict[str, str]:
    """scontrol's fields of the job (of a heterogeneous job: its first component, which runs the
    batch script)."""
    out = cluster.run("scontrol", "show", "job", "--oneliner", job_id).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out.splitlines()[0] if out else ""))


def wait_job(cluster, job_id: str, timeout_s: float, *, on_poll=None) -> dict[str, str]:
    """Poll until the job reached a final state (requeued jobs go on); returns scontrol's fields."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = job_info(cluster, job_id)
        if info.get("JobState") in TERMINAL:
            return info
        if on_poll:
            on_poll()
        assert time.monotonic() < deadline, f"job {job_id} not done within {timeout_s:.0f} s: {info}\n" \
                                            f"{sbatch_log(info)[-3000:]}"
        time.sleep(0.5)


def sbatch_log(info: dict[str, str]) -> str:
    path = Path(info.get("StdOut", ""))
    return path.read_text(errors="replace") if path.is_file() else ""


def task_logs(info: dict[str, str]) -> str:
    folder = Path(info.get("StdOut", "")).parent
    return "\n".join(p.read_text(errors="replace") for p in sorted(folder.glob(f"log-*_{info['JobId']}_*.out")))


def slurm_time(text: str) -> float:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").timestamp()


def checkpoint_step(output_dir: Path) -> int:
    """The step of the run's newest checkpoint, found as the trainer finds it."""
    path = latest_checkpoint(str(output_dir / CHECKPOINT_SUBDIR))
    return json.loads((Path(path) / STATE_FILE).read_text())["step"]


def steps(output_dir: Path) -> list[int]:
    path = output_dir / "metrics.jsonl"
    return [r["step"] for r in read_metrics(str(path))] if path.is_file() else []


def stop_figures(first: dict[str, str]) -> float:
    """Seconds from the batch shell's stop request to the job's end (Slurm's EndTime)."""
    asked = re.search(r"asking the trainer to checkpoint and stop at (\d{4}-\d\d-\d\dT[\d:]+)", sbatch_log(first))
    assert asked, sbatch_log(first)[-3000:]
    return slurm_time(first["EndTime"]) - slurm_time(asked.group(1))


# ------------------------------------------------------------------ walltime stop, chained resume

NUM_STEPS = 150
SIGNAL_LEAD_S = 240


def near_walltime(cluster, job_id: str, out: Path, *, after_steps: int = 3, timeout_s: float = 300) -> None:
    """Once the job has trained `after_steps` steps, shorten its time limit (as an administrator
    can) so that its end is less than SIGNAL_LEAD_S away: Slurm's controller then sends the
    job's own `--signal=B:USR1@<lead>` at its next look (at most 30 s later), mid-run, however
    long this machine took to start the trainer. Chained jobs keep their full limit."""
    deadline = time.monotonic() + timeout_s
    while len(steps(out)) < after_steps:
        assert job_info(cluster, job_id).get("JobState") in ("PENDING", "RUNNING"), "the job ended early"
        assert time.monotonic() < deadline, f"no step {after_steps} within {timeout_s:.0f} s"
        time.sleep(0.2)
    elapsed_min = -(-slurm_elapsed(job_info(cluster, job_id)["RunTime"]) // 60)
    limit = elapsed_min + SIGNAL_LEAD_S // 60 - 1  # end - now in (lead - 60, lead] seconds
    assert cluster.run("scontrol", "update", f"JobId={job_id}", f"TimeLimit={limit}").returncode == 0


def slurm_elapsed(text: str) -> int:
    """Seconds of a Slurm duration `[D-]HH:MM:SS`."""
    days, _, clock = text.rpartition("-")
    h, m, sec = (int(x) for x in clock.split(":"))
    return (int(days or 0) * 24 + h) * 3600 + m * 60 + sec


@pytest.fixture(scope="module")
def chained_run(slurm_cluster, tmp_path_factory):
    """The tiny run as two chained jobs: the first is stopped by its walltime signal, the second
    resumes it to the end. An uninterrupted run of the same recipe trains beside them (locally)."""
    tmp = tmp_path_factory.mktemp("chained")
    out, ref = tmp / "run", tmp / "reference"
    overrides = [*TINY_OVERRIDES, f"run.num_steps={NUM_STEPS}"]
    reference = subprocess.Popen([PYTHON, "-m", "megatron_s2lpo.cli", "train", TINY, *overrides,
                                  f"run.output_dir={ref}"], cwd=REPO, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
    try:
        ids = launch(slurm_cluster, tmp, "--time", "00:10:00", "--signal-lead", str(SIGNAL_LEAD_S),
                     "--max-chained-jobs", "1", overrides=[*overrides, f"run.output_dir={out}"])
        assert len(ids) == 2
        near_walltime(slurm_cluster, ids[0], out)
        first = wait_job(slurm_cluster, ids[0], 300)
        stopped = steps(out)
        resumed_at: list[float] = []

        def watch_resume():
            if not resumed_at and len(steps(out)) > len(stopped):
                resumed_at.append(time.time())

        second = wait_job(slurm_cluster, ids[1], 500, on_poll=watch_resume)
        _, err = reference.communicate(timeout=500)
        assert reference.returncode == 0, err[-3000:]
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()
    figures = {"stop_to_end_s": stop_figures(first),
               "resume_s": (resumed_at[0] - slurm_time(first["EndTime"])) if resumed_at else float("nan")}
    print(f"\nslurm tier: walltime signal -> job end {figures['stop_to_end_s']:.0f} s; job end -> the chained "
          f"job's first resumed step {figures['resume_s']:.0f} s")
    return dict(tmp=tmp, out=out, ref=ref, ids=ids, first=first, second=second, stopped=stopped,
                overrides=overrides, figures=figures)


@pytest.mark.timeout(900)
def test_walltime_signal_checkpoints_and_the_chained_job_resumes_as_if_uninterrupted(chained_run):
    first, second, stopped, out = (chained_run[k] for k in ("first", "second", "stopped", "out"))
    log = sbatch_log(first)
    # the signal stopped the trainer mid-run: its last step is checkpointed, the job ended by itself
    assert "time limit near: asking the trainer to checkpoint and stop" in log
    assert "stopped on request" in task_logs(first)
    assert 0 < len(stopped) < NUM_STEPS, f"the first job trained {len(stopped)} of {NUM_STEPS} steps"
    assert (first["JobState"], first["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert "DUE TO TIME LIMIT" not in log
    # the chained job (afterany) resumed from that checkpoint and finished the run
    assert second["Dependency"] == "(null)" and slurm_time(second["StartTime"]) >= slurm_time(first["EndTime"])
    assert (second["JobState"], second["ExitCode"]) == ("COMPLETED", "0:0"), sbatch_log(second)[-3000:]
    assert steps(out) == list(range(1, NUM_STEPS + 1))
    assert checkpoint_step(out) == NUM_STEPS
    # ... exactly as the uninterrupted run (timings aside)
    resumed = [without_timing(r) for r in read_metrics(str(out / "metrics.jsonl"))]
    reference = [without_timing(r) for r in read_metrics(str(chained_run["ref"] / "metrics.jsonl"))]
    assert resumed == reference
    # the stop request and the job's end follow each other within seconds, not minutes
    assert chained_run["figures"]["stop_to_end_s"] < 60, chained_run["figures"]


@pytest.mark.timeout(300)
def test_resubmitting_a_finished_run_does_nothing(slurm_cluster, chained_run):
    out = chained_run["out"]
    before = (out / "metrics.jsonl").read_text()
    ids = launch(slurm_cluster, chained_run["tmp"], "--time", "00:05:00",
                 overrides=[*chained_run["overrides"], f"run.output_dir={out}"])
    info = wait_job(slurm_cluster, ids[0], 240)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), sbatch_log(info)[-3000:]
    assert "the run finished already" in task_logs(info)
    assert (out / "metrics.jsonl").read_text() == before


def job_processes(job_id: str) -> list[str]:
    """Live processes of Slurm job `job_id` on this machine (every emulated node): those whose
    environment holds SLURM_JOB_ID=<id>."""
    needle = f"SLURM_JOB_ID={job_id}\0".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state = (entry / "stat").read_text().split(")")[-1].split()[0]
            if needle in (entry / "environ").read_bytes() and state != "Z":
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{entry.name}: {command[:160]}")
        except OSError:
            continue
    return found


def wait_no_processes(job_id: str, timeout_s: float = 60) -> list[str]:
    """A job's processes end shortly after the job (slurmstepd reaps them): wait that long."""
    deadline = time.monotonic() + timeout_s
    while (left := job_processes(job_id)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


# ------------------------------------------------------------------ two nodes under torchrun

@pytest.mark.timeout(900)
def test_two_nodes_under_torchrun_both_stop_on_the_signal_and_resume(slurm_cluster, tmp_path):
    out = tmp_path / "run"
    num_steps = 60  # a quarter of the tiny recipe's batch: two ranks on a shared machine are slow
    overrides = [*TINY_OVERRIDES, "data.prompts_per_step=4", "algo.group_size=4", f"run.num_steps={num_steps}",
                 f"run.output_dir={out}"]
    ids = launch(slurm_cluster, tmp_path, "--nodes", "2", "--torchrun-port", str(free_port()), "--time", "00:10:00",
                 "--signal-lead", str(SIGNAL_LEAD_S), "--max-chained-jobs", "1", overrides=overrides)
    near_walltime(slurm_cluster, ids[0], out)
    first = wait_job(slurm_cluster, ids[0], 300)
    assert first["NodeList"] == "s2lpo-n[1-2]" and first["NumNodes"] == "2"
    logs = task_logs(first)
    stopped = steps(out)
    assert (first["JobState"], first["ExitCode"]) == ("COMPLETED", "0:0"), sbatch_log(first)[-3000:] + logs[-3000:]
    assert 0 < len(stopped) < num_steps
    # both ranks (one per node) took the request; they agreed on the step, which is checkpointed
    assert logs.count("SIGUSR1: finishing the current step") == 2, logs[-3000:]
    assert checkpoint_step(out) == stopped[-1]
    second = wait_job(slurm_cluster, ids[1], 600)
    assert (second["JobState"], second["ExitCode"]) == ("COMPLETED", "0:0"), sbatch_log(second)[-3000:]
    assert steps(out) == list(range(1, num_steps + 1)) and checkpoint_step(out) == num_steps
    print(f"\nslurm tier: 2 nodes x torchrun: walltime signal -> job end {stop_figures(first):.0f} s")


# ------------------------------------------------------------------ scancel, usage errors, servers

@pytest.mark.timeout(600)
def test_scancel_mid_run_checkpoints_the_step_in_flight(slurm_cluster, tmp_path):
    out = tmp_path / "run"
    ids = launch(slurm_cluster, tmp_path, "--time", "00:10:00", overrides=[*TINY_OVERRIDES, "run.num_steps=400",
                                                                             f"run.output_dir={out}"])
    deadline = time.monotonic() + 300
    while len(steps(out)) < 3:
        assert job_info(slurm_cluster, ids[0]).get("JobState") in ("PENDING", "RUNNING"), "the job ended early"
        assert time.monotonic() < deadline, "no third step within 300 s"
        time.sleep(0.2)
    assert slurm_cluster.run("scancel", ids[0]).returncode == 0
    info = wait_job(slurm_cluster, ids[0], 120)
    assert info["JobState"] == "CANCELLED"
    done = steps(out)
    assert 3 <= len(done) < 400
    # SIGTERM reached the trainer, which finished its step and checkpointed it (no periodic
    # checkpoint could have: run.save_every is 1000)
    assert "SIGTERM: finishing the current step" in task_logs(info)
    assert checkpoint_step(out) == done[-1]
    assert not wait_no_processes(ids[0])


@pytest.mark.timeout(300)
def test_a_usage_error_fails_the_job_once_even_with_retries(slurm_cluster, tmp_path):
    missing = tmp_path / "no-such-data.jsonl"
    ids = launch(slurm_cluster, tmp_path, "--time", "00:05:00", "--retries", "2",
                 overrides=[*TINY_OVERRIDES, "run.num_steps=4", f"data.train_path={missing}",
                            f"run.output_dir={tmp_path / 'run'}"])
    info = wait_job(slurm_cluster, ids[0], 240)
    log = sbatch_log(info)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "2:0", "0"), log[-3000:]
    assert "status 2 is a usage or configuration error: not requeued" in log
    assert "s2lpo train: error:" in log  # the trainer's own error, quoted from its log in the job's output
    assert not wait_no_processes(ids[0])


@pytest.mark.timeout(300)
def test_a_server_that_dies_ends_the_job_with_its_error_and_no_stray_process(slurm_cluster, tmp_path):
    """The explorer's server on its own node (a heterogeneous job) exits at once: its interpreter
    has no SGLang. The trainer, waiting for it, is stopped; the job fails naming the server."""
    ids = launch(slurm_cluster, tmp_path, "--nodes", "2", "--time", "00:05:00", "--retries", "1",
                 "--sglang-python", PYTHON,
                 overrides=[*TINY_OVERRIDES, "run.num_steps=4", "rollout.explorer.backend=sglang",
                            f"rollout.explorer.model_path={tmp_path}", "rollout.explorer.init_arch=null",
                            f"run.output_dir={tmp_path / 'run'}"])
    info = wait_job(slurm_cluster, ids[0], 240)
    log = sbatch_log(info)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "1:0", log[-3000:]
    assert "task 1 (explorer_server) ended first, with status 1" in log
    assert "No module named sglang" in log
    # a server failure may pass on another try: requeued once, then given up
    assert info["Restarts"] == "1" and log.count("requeueing the job") == 1
    assert not wait_no_processes(ids[0])


# ------------------------------------------------------------------ the preflight

def check(cluster, tmp_path: Path, *args: str, overrides: list[str] = ()) -> tuple[int, str]:
    command = [PYTHON, str(REPO / "examples" / "launch.py"), "--recipe", TINY, "--executor", "slurm", "--nodes", "1",
               "--account", "s2lpo", "--partition", "batch", "--gpus-per-node", "0", "--check", *args,
               f"run.output_dir={tmp_path / 'run'}", *overrides]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, **cluster.env}, stdin=subprocess.DEVNULL)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.timeout(300)
def test_check_reports_what_the_launch_needs_from_this_site(slurm_cluster, tmp_path):
    rc, out = check(slurm_cluster, tmp_path, "--venv", VENV, "--step-time", "0.5", overrides=["run.save_every=5"])
    assert rc == 0, out
    lines = out.splitlines()
    assert any(re.match(r"ok +sinfo: slurm-wlm 22\.05", x) for x in lines), out
    assert any(re.match(r"ok +partition: batch is up, 3 nodes", x) for x in lines), out
    assert any(re.match(r"ok +time limit: partition 20:00", x) for x in lines), out
    assert any(re.match(r"ok +pyxis: absent", x) for x in lines), out
    assert any(re.match(r"ok +gpus: 8 per node \(gres gpu:8\)", x) for x in lines), out
    assert any(re.match(rf"(ok|warn) +environment: {re.escape(VENV)}/bin/python: megatron-core 0\.16\.1", x)
               for x in lines), out
    # what this site cannot give, each with its fix
    rc, out = check(slurm_cluster, tmp_path, "--container-image", "registry.example.com/s2lpo:0.1.0",
                    "--gpus-per-node", "16", "--time", "00:30:00",
                    overrides=[f"data.train_path={tmp_path / 'missing.parquet'}"])
    assert rc == 1
    for expected in (r"FAIL pyxis: srun has no --container-image: this Slurm has no pyxis -> run without a "
                     r"container: drop --container-image and name the environment with --venv DIR",
                     r"FAIL gpus: the nodes have 8 GPU\(s\) each .* -> pass --gpus-per-node 8",
                     r"FAIL time limit: --time 00:30:00 is longer than the partition's 20:00 -> pass --time 20:00",
                     r"FAIL paths: data.train_path=\S+missing.parquet is under none of the --mounts"):
        assert re.search(expected, out), (expected, out)
    rc, out = check(slurm_cluster, tmp_path, "--venv", VENV, "--step-time", "4", overrides=["run.save_every=3"])
    assert rc == 1 and re.search(r"FAIL time limit: .*lower run.save_every to 1", out), out


# ------------------------------------------------------------------ the S2L-PO layout, real SGLang

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


def _unauthenticated_generate(url: str) -> int:
    request = urllib.request.Request(f"{url}/generate", data=b'{"text": "1+1=", "sampling_params": {}}',
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.timeout(1500)
def test_the_s2lpo_layout_with_real_sglang_servers_stops_on_the_walltime_and_resumes(slurm_cluster, tmp_path):
    """Trainer, learner server and explorer server each on an emulated node of their own (one
    heterogeneous job), the servers real SGLang 0.5.23 on CPU behind the job's key; a few S2L-PO
    steps, the walltime stop, and the chained job resumes with fresh servers."""
    from megatron_s2lpo.rollout.sglang_python import sglang_python

    out = tmp_path / "run"
    models = _tiny_models(tmp_path / "models")
    num_steps = 40
    ports = free_ports(3)
    overrides = [*TINY_OVERRIDES, "data.prompts_per_step=4", "algo.group_size=4", f"algo.t_mix={num_steps // 2}",
                 f"run.num_steps={num_steps}", f"run.output_dir={out}", "sync.parity_every=5"]
    for name in ("learner", "explorer"):
        overrides += [f"rollout.{name}.backend=sglang", f"rollout.{name}.profile=cpu",
                      f"rollout.{name}.model_path={models[name]}", f"rollout.{name}.init_arch=null",
                      f"rollout.{name}.init_sft_steps=0"]
    ids = launch(slurm_cluster, tmp_path, "--nodes", "3", "--time", "00:15:00", "--signal-lead", str(SIGNAL_LEAD_S),
                 "--max-chained-jobs", "1", "--sglang-python", sglang_python(),
                 "--server-ports", ",".join(map(str, ports)), overrides=overrides)
    deadline = time.monotonic() + 600
    while len(steps(out)) < 1:
        assert job_info(slurm_cluster, ids[0]).get("JobState") in ("PENDING", "RUNNING"), \
            sbatch_log(job_info(slurm_cluster, ids[0]))[-3000:]
        assert time.monotonic() < deadline, "no first step within 600 s"
        time.sleep(1)
    # three components, three nodes; each server requires the job's key
    components = [job_info(slurm_cluster, str(int(ids[0]) + i)) for i in range(3)]
    assert [c.get("HetJobOffset") for c in components] == ["0", "1", "2"]
    assert len({c["NodeList"] for c in components}) == 3, [c["NodeList"] for c in components]
    for component, port in zip(components[1:], ports):
        assert _unauthenticated_generate(f"http://{component['NodeList']}:{port}") == 401
    near_walltime(slurm_cluster, ids[0], out, after_steps=2, timeout_s=600)
    first = wait_job(slurm_cluster, ids[0], 300)
    stopped = steps(out)
    assert (first["JobState"], first["ExitCode"]) == ("COMPLETED", "0:0"), sbatch_log(first)[-3000:]
    assert 2 <= len(stopped) < num_steps and checkpoint_step(out) == stopped[-1]
    assert not wait_no_processes(ids[0])  # the servers went with the job
    second = wait_job(slurm_cluster, ids[1], 900)
    assert (second["JobState"], second["ExitCode"]) == ("COMPLETED", "0:0"), sbatch_log(second)[-3000:]
    records = read_metrics(str(out / "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(1, num_steps + 1))
    assert records[0]["G_w"] > 0 and records[-1]["G_w"] == 0  # the explorer's share annealed away
    assert all(r["weight_version"] == r["step"] for r in records)  # every update reached the learner server
    print(f"\nslurm tier: S2L-PO with real SGLang servers: walltime signal -> job end {stop_figures(first):.0f} s")
