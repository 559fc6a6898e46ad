"""Submitting the tier's jobs as a user does, and reading what Slurm and the trainer did.

Every job is submitted with `examples/launch.py --executor slurm --venv ...` (NeMo-Run's
SlurmExecutor and its sbatch) on the tiny CPU recipe; what the tests check is what Slurm did
(job states, exit codes, restarts, times) and what the trainer left (checkpoints, metrics, logs).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from megatron_s2lpo.learner.checkpoint import STATE_FILE, latest_checkpoint
from megatron_s2lpo.trainer.metrics import read_metrics
from megatron_s2lpo.trainer.run_dir import CHECKPOINT_SUBDIR

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable  # this checkout's environment: the jobs run in it (--venv)
VENV = str(Path(sys.prefix))
TINY = str(REPO / "examples" / "tiny_cpu.yaml")
# The tiny recipe with a short warm start, no evaluation and no periodic checkpoint (a
# checkpoint found after a stop was written by the stop).
TINY_OVERRIDES = ["run.eval_every=0", "rollout.learner.init_sft_steps=20", "rollout.explorer.init_sft_steps=40",
                  "run.save_every=1000"]
# A quarter of the tiny recipe's batch, where the test is about the launch, not the training.
SMALL_BATCH = ["data.prompts_per_step=4", "algo.group_size=4"]
TERMINAL = {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE"}


def launch(cluster, tmp_path: Path, *args: str, overrides: list[str], timeout_s: float = 180) -> list[str]:
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
    batch script; scontrol prints one line per component)."""
    out = cluster.run("scontrol", "show", "job", "--oneliner", job_id).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out.splitlines()[0] if out else ""))


def wait_job(cluster, job_id: str, timeout_s: float, *, on_poll=None) -> dict[str, str]:
    """Poll until the job reached a final state (a requeued job goes on); returns scontrol's
    fields. A final state is shown once every process of the job has ended (not COMPLETING)."""
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


def wait_steps(cluster, job_id: str, out: Path, num_steps: int, timeout_s: float = 300, *, on_poll=None) -> None:
    """Poll until the run in `out` has logged `num_steps` steps while job `job_id` waits or runs."""
    deadline = time.monotonic() + timeout_s
    while len(steps(out)) < num_steps:
        info = job_info(cluster, job_id)
        assert info.get("JobState") in ("PENDING", "RUNNING"), \
            f"job {job_id} ended before step {num_steps}: {info}\n{sbatch_log(info)[-3000:]}\n{task_logs(info)[-3000:]}"
        assert time.monotonic() < deadline, f"no step {num_steps} within {timeout_s:.0f} s"
        if on_poll:
            on_poll()
        time.sleep(0.2)


def signal_batch_shell(cluster, job_id: str) -> None:
    """SIGUSR1 to the job's batch shell, what Slurm sends ahead of the time limit for the job's
    `--signal=B:USR1@<lead>` (the tier waits for Slurm's own signal in one test only: the
    controller looks at time limits every 30 s)."""
    proc = cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    assert proc.returncode == 0, proc.stderr


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


def stopped_step(info: dict[str, str], signal_name: str) -> int:
    """The step after which the trainer of job `info` stopped on `signal_name` (its own words)."""
    match = re.search(rf"stopped on {signal_name} after step (\d+), which is checkpointed", task_logs(info))
    assert match, task_logs(info)[-3000:]
    return int(match.group(1))


def stop_to_end_s(info: dict[str, str]) -> float:
    """Seconds from the batch shell's stop request to the job's end (Slurm's EndTime)."""
    asked = re.search(r"asking the trainer to checkpoint and stop at (\d{4}-\d\d-\d\dT[\d:]+)", sbatch_log(info))
    assert asked, sbatch_log(info)[-3000:]
    return slurm_time(info["EndTime"]) - slurm_time(asked.group(1))


class ResumeWatch:
    """Called while a chained job runs: notes when the run logged its first step after `done`."""

    def __init__(self, out: Path, done: int) -> None:
        self.out, self.done, self.at = out, done, None

    def __call__(self) -> None:
        if self.at is None and len(steps(self.out)) > self.done:
            self.at = time.time()

    def seconds_after(self, info: dict[str, str]) -> float:
        """From the end of job `info` to the first resumed step."""
        return self.at - slurm_time(info["EndTime"]) if self.at is not None else float("nan")


def job_processes(*job_ids: str) -> list[str]:
    """Live processes of the given Slurm jobs on this machine (every emulated node): those whose
    environment holds SLURM_JOB_ID=<id>."""
    needles = [f"SLURM_JOB_ID={job_id}\0".encode() for job_id in job_ids]
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state = (entry / "stat").read_text().split(")")[-1].split()[0]
            environ = (entry / "environ").read_bytes()
            if state != "Z" and any(n in environ for n in needles):
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{entry.name}: {command[:160]}")
        except OSError:
            continue
    return found


def wait_no_processes(*job_ids: str, timeout_s: float = 60) -> list[str]:
    """A job's processes end shortly after the job (slurmstepd reaps them): wait that long."""
    deadline = time.monotonic() + timeout_s
    while (left := job_processes(*job_ids)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def slurm_elapsed(text: str) -> int:
    """Seconds of a Slurm duration `[D-]HH:MM:SS`."""
    days, _, clock = text.rpartition("-")
    h, m, sec = (int(x) for x in clock.split(":"))
    return (int(days or 0) * 24 + h) * 3600 + m * 60 + sec


def near_walltime(cluster, job_id: str, signal_lead_s: int) -> None:
    """Shorten the running job's time limit (as an administrator can) so that its end is less
    than `signal_lead_s` away: Slurm's controller sends the job's own `--signal=B:USR1@<lead>`
    at its next look at time limits (every 30 s), however long this machine took to start the
    job. Chained jobs keep their full limit."""
    elapsed_min = -(-slurm_elapsed(job_info(cluster, job_id)["RunTime"]) // 60)
    limit = elapsed_min + signal_lead_s // 60 - 1  # end - now in (lead - 60, lead] seconds
    proc = cluster.run("scontrol", "update", f"JobId={job_id}", f"TimeLimit={limit}")
    assert proc.returncode == 0, proc.stderr
