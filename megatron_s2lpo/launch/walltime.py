"""A job's walltime against the run: time limits, the stop signal's lead, checkpoints that fit.

A Slurm job ends at its time limit. The launcher asks Slurm to signal the job `signal_lead_s`
seconds before (`--signal=B:USR1@<lead>`): the trainer finishes its step, checkpoints it and
stops (stop_signal.py), and a chained job continues. The periodic checkpoints (`run.save_every`)
still matter: they are what a crash, a node failure or a missed signal falls back to. So the
plan refuses a `save_every` whose steps do not fit in one job, at the step time measured by an
earlier run of the same recipe (its metrics.jsonl) or stated for the recipe, and warns when no
step time is known.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import warnings
from collections.abc import Callable

from .sbatch import MONITOR_PERIOD_S

# Slurm's --signal accepts at most this many seconds of lead (sbatch(1)).
MAX_SIGNAL_LEAD_S = 65535
# Allowance for the servers to load and the trainer to build before its first step (a job
# shorter than SHORT_JOB_S gets a quarter of its time: a smoke test of a small model).
STARTUP_S = 600
SHORT_JOB_S = 4 * STARTUP_S
# What the batch script adds between the trainer's exit and the job's end: the monitor loop
# notices the exit and waits once more before it ends the job (sbatch.MONITOR_PERIOD_S; its trap
# itself runs when the signal arrives, sbatch.INTERRUPTIBLE_SLEEP).
JOB_END_S = 2 * MONITOR_PERIOD_S
# A checkpoint of an 8B learner with its optimizer state: a few minutes on shared storage.
SAVE_ALLOWANCE_S = 600
_UNLIMITED = {"unlimited", "infinite", "none", "n/a"}


class LaunchWarning(UserWarning):
    """Something the launcher could not check or that will probably go wrong, but may be intended."""


def parse_slurm_time(text: str) -> int | None:
    """Seconds in a Slurm time ("minutes", "minutes:seconds", "hours:minutes:seconds", "days-hours",
    "days-hours:minutes", "days-hours:minutes:seconds"); None for UNLIMITED / infinite."""
    value = text.strip()
    if value.lower() in _UNLIMITED:
        return None
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value)
    if not match:
        raise ValueError(f"time {text!r} is not a Slurm time: use HH:MM:SS, D-HH:MM:SS or minutes")
    days, a, b, c = (int(g) if g is not None else None for g in match.groups())
    if days is not None:  # days-hours[:minutes[:seconds]]
        return ((days * 24 + a) * 60 + (b or 0)) * 60 + (c or 0)
    if c is not None:  # hours:minutes:seconds
        return (a * 60 + b) * 60 + c
    if b is not None:  # minutes:seconds
        return a * 60 + b
    return a * 60  # minutes


def format_slurm_time(seconds: float) -> str:
    """`D-HH:MM:SS` (or `HH:MM:SS` under a day), rounded up to the second."""
    total = int(math.ceil(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{days}-{clock}" if days else clock


def partition_time_limit(partition: str, run: Callable[[str], str]) -> str:
    """The partition's maximum time as sinfo reports it; `run(command) -> stdout` runs a shell
    command where Slurm is (this machine, or the login node over SSH)."""
    command = f"sinfo --noheader --partition {shlex.quote(partition)} --format %l"
    try:
        out = run(command)
    except Exception as err:  # noqa: BLE001 -- any failure means: no limit known here
        raise ValueError(f"could not read partition {partition!r}'s time limit ({command}: {err}); "
                         "pass --time HH:MM:SS") from err
    limits = [line.strip() for line in out.splitlines() if line.strip()]
    if not limits:
        raise ValueError(f"sinfo knows no partition {partition!r} (empty answer to `{command}`): check "
                         "--partition, or pass --time HH:MM:SS")
    if parse_slurm_time(limits[0]) is None:
        raise ValueError(f"partition {partition!r} has no time limit ({limits[0]}): pass --time HH:MM:SS "
                         "so the job can be signalled before it ends")
    return limits[0]


def measured_step_time(output_dir: str, mounts: list[str], *, last: int = 10) -> tuple[float, str] | None:
    """(seconds, metrics path): the slowest of the last `last` steps an earlier job of this run
    logged, read through the container mount that holds `output_dir`; None if none is readable."""
    host_dir = host_path(output_dir, mounts)
    if host_dir is None:
        return None
    path = os.path.join(host_dir, "metrics.jsonl")
    times = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    value = json.loads(line).get("time/step")
                except (ValueError, AttributeError):
                    continue
                if isinstance(value, (int, float)) and value > 0:
                    times.append(float(value))
    except OSError:
        return None
    return (max(times[-last:]), path) if times else None


def host_path(container_path: str, mounts: list[str]) -> str | None:
    """The host path behind `container_path` under the mounts `host:container[:flags]`, or None."""
    best: tuple[int, str] | None = None
    target = os.path.normpath(container_path)
    for mount in mounts:
        host, container = mount.split(":")[:2]
        container = os.path.normpath(container)
        if target == container or target.startswith(container.rstrip("/") + "/"):
            if best is None or len(container) > best[0]:
                best = (len(container), os.path.join(host, os.path.relpath(target, container)))
    return None if best is None else os.path.normpath(best[1])


def default_signal_lead(step_time_s: float) -> int:
    """One step, a checkpoint and the batch script's own delays (JOB_END_S) before the limit, or
    15 minutes when no step time is known."""
    lead = step_time_s + SAVE_ALLOWANCE_S + JOB_END_S if step_time_s > 0 else 900
    return int(min(MAX_SIGNAL_LEAD_S, math.ceil(lead / 60) * 60))


def startup_allowance(walltime_s: int) -> int:
    """Seconds a job is assumed to need before its first step: STARTUP_S, or a quarter of a job
    shorter than SHORT_JOB_S (a smoke test asks for little time because it starts fast)."""
    return STARTUP_S if walltime_s >= SHORT_JOB_S else walltime_s // 4


def check_walltime(*, save_every: int, num_steps: int, walltime_s: int, signal_lead_s: int,
                   step_time_s: float, source: str, startup_s: int = STARTUP_S) -> None:
    """Refuse a run whose periodic checkpoints do not fit in one job; warn what cannot be checked.

    `step_time_s` 0 means unknown (warns); `source` says where a known one came from; `startup_s`
    is the time before the first step (startup_allowance, or --startup-time).
    """
    if signal_lead_s >= walltime_s:
        raise ValueError(f"--signal-lead {signal_lead_s} s is not shorter than the job's time limit "
                         f"{format_slurm_time(walltime_s)}; lower it or ask for more --time")
    if step_time_s <= 0:
        warnings.warn("no step time is known for this recipe (no metrics.jsonl of an earlier job under the "
                      "mounts, no stated one): cannot check that run.save_every fits in the walltime; pass "
                      "--step-time MINUTES", LaunchWarning, stacklevel=2)
        return
    budget = walltime_s - signal_lead_s - startup_s
    interval = save_every if 0 < save_every < num_steps else num_steps
    what = (f"run.save_every={save_every}" if 0 < save_every < num_steps
            else f"run.save_every={save_every} (a checkpoint only after the last of {num_steps} steps)")
    if interval * step_time_s > budget:
        fit = int(budget // step_time_s)
        need = interval * step_time_s + signal_lead_s + startup_s
        advice = f"lower run.save_every to {fit}" if fit >= 1 else "a single step does not fit"
        raise ValueError(
            f"{what} x {step_time_s / 60:.1f} min per step ({source}) = {interval * step_time_s / 60:.0f} min "
            f"does not fit in the {max(budget, 0) / 60:.0f} min a job of {format_slurm_time(walltime_s)} has for "
            f"steps (minus the {signal_lead_s / 60:.0f} min stop-signal lead and {startup_s / 60:.0f} min to start, "
            f"--startup-time): {advice}, or ask for --time {format_slurm_time(need)} or more")
    if signal_lead_s < step_time_s + SAVE_ALLOWANCE_S / 2:
        warnings.warn(f"--signal-lead {signal_lead_s} s leaves less than a step ({step_time_s:.0f} s, {source}) "
                      "plus a checkpoint before the time limit: the step in flight may not finish and the "
                      "job falls back to its last periodic checkpoint", LaunchWarning, stacklevel=2)
