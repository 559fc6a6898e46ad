"""Pieces of the sbatch script NeMo-Run writes for a run that NeMo-Run has no option for.

- exported values are quoted (NeMo-Run 0.11.1 writes `export KEY=value` as given);
- the batch shell passes Slurm's early SIGUSR1 (`--signal=B:USR1@<lead>`) to the trainer's srun,
  which hands it to every process of the trainer's step (srun forwards SIGUSR1; slurmstepd
  signals the step's whole process container), and the trainer stops after a checkpoint; the
  shell's sleeps are interruptible, so the trap runs when the signal arrives;
- raw `--sbatch-arg`s become `#SBATCH` lines, refusing the ones the launcher sets itself.
"""

from __future__ import annotations

import shlex

RESEND_S = 10  # the stop request is repeated this often until the trainer's srun ends

# sbatch options the launcher sets from the plan or a dedicated flag: a raw --sbatch-arg for one
# of them would silently fight the layout (NeMo-Run lets additional_parameters win).
_MANAGED = {
    "account": "--account", "partition": "--partition", "time": "--time", "signal": "--signal-lead",
    "qos": "--qos", "constraint": "--constraint", "gres": "--gres", "reservation": "--reservation",
    "mem": "--mem", "dependency": "--max-chained-jobs", "nodes": "--nodes", "ntasks-per-node": None,
    "gpus-per-node": "--gpus-per-node", "job-name": "--title", "output": "--job-dir", "error": "--job-dir",
    "exclusive": None,
}


def quoted_env(env: dict[str, str]) -> dict[str, str]:
    """Values quoted for `export KEY=<value>`: the job gets exactly the string given (no word
    splitting, globbing or expansion on the compute node)."""
    for key in env:
        if not key.replace("_", "").isalnum() or key[0].isdigit():
            raise ValueError(f"--env {key!r}: environment variable names are letters, digits and _, "
                             "not starting with a digit")
    return {key: shlex.quote(value) for key, value in env.items()}


def parse_sbatch_args(args: list[str]) -> dict[str, str | bool]:
    """`--sbatch-arg` values (`mail-type=END`, `--comment=x`, `requeue`) -> NeMo-Run's
    additional_parameters (`#SBATCH --<key>=<value>`, or `#SBATCH --<key>` for a bare flag)."""
    out: dict[str, str | bool] = {}
    for arg in args:
        key, sep, value = arg.lstrip("-").partition("=")
        key = key.strip()
        if not key or key.startswith("-") or " " in key:
            raise ValueError(f"--sbatch-arg {arg!r} must look like KEY=VALUE or KEY (an sbatch long option)")
        if key in _MANAGED:
            flag = _MANAGED[key]
            how = f"use {flag}" if flag else "the launcher sets it from the recipe's layout"
            raise ValueError(f"--sbatch-arg {arg!r}: --{key} is set by the launcher ({how})")
        out[key.replace("-", "_")] = value if sep else True
    return out


# NeMo-Run's batch script waits for its sruns in a loop that sleeps this long between looks
# (`monitor_group_job_wait_time`, 60 s by default) and again before it stops the other tasks
# once one has ended: the job ends at most twice the period after the trainer (walltime.py
# budgets it in the signal's lead). Between the sruns' starts it waits `STAGGER_S`.
MONITOR_PERIOD_S = 2
STAGGER_S = 2
# bash runs a trap only once the command in the foreground has ended, and NeMo-Run's loop
# sleeps in the foreground: Slurm's stop signal would wait for the current sleep. A sleep in
# the background that the shell waits for is cut short by a trapped signal (`wait` returns at
# once), so the trap runs when the signal arrives; the sleep itself is then ended.
INTERRUPTIBLE_SLEEP = (
    'sleep() { command sleep "$@" & local s=$!; wait "$s"; local rc=$?; command kill "$s" 2>/dev/null; '
    'return "$rc"; }')

def stop_signal_trap(trainer_index: int) -> str:
    """Batch-shell lines: on SIGUSR1 (Slurm's early warning), signal the trainer's srun, and again
    every RESEND_S seconds while it runs.

    `pids[i]` is the array NeMo-Run's sbatch template fills with each srun's pid in task order; the
    trap body is expanded when the signal arrives, after the sruns started. The repeats matter
    when the signal comes while the trainer is still starting (imports, loading a checkpoint,
    waiting for its servers): until its handler is installed the task ignores SIGUSR1 (the
    trainer script's `trap '' USR1`), and the first request would be lost; the trainer acts on
    the first one it receives and ignores the rest.
    """
    return "\n".join([
        "# Slurm signals this shell ahead of the time limit (--signal=B:USR1@...): the trainer finishes",
        "# its step, checkpoints it and exits; the job ends, and a chained job resumes the run.",
        "# The loop's sleeps wait in the background, so the trap runs when the signal arrives.",
        INTERRUPTIBLE_SLEEP,
        "s2lpo_stop_trainer() {",
        '  echo "s2lpo: time limit near: asking the trainer to checkpoint and stop at $(date +%Y-%m-%dT%H:%M:%S)"',
        f'  local trainer="${{pids[{trainer_index}]}}"',
        f'  ( while kill -USR1 "$trainer" 2>/dev/null; do sleep {RESEND_S}; done ) &',
        "}",
        "trap s2lpo_stop_trainer USR1",
    ])


# Exit statuses that the same job would meet again: a usage or configuration error (the
# trainer's ValueError / FileNotFoundError, argparse). Requeueing them only burns allocations.
DETERMINISTIC_EXIT_CODES = (2,)


def job_end_trap(task_names: list[str], max_retries: int) -> str:
    """Batch-shell lines: when the job's script exits, say which task ended it and requeue the
    job for a failure that another try may not meet (at most `max_retries` times).

    NeMo-Run's monitor loop leaves `$pid` set to the srun that ended first and exits with its
    status; `pids[i]` is task i's srun. Task i's output is `log-*-<i>_*.out` beside the sbatch
    output (scontrol tells where that is). NeMo-Run's own requeue is turned off (retries=0):
    it requeues every non-zero status.
    """
    names = " ".join(shlex.quote(n) for n in task_names)
    codes = " ".join(str(c) for c in DETERMINISTIC_EXIT_CODES)
    return "\n".join([
        "# When the job's script ends: name the task that ended it, requeue a failure that may pass",
        "# on another try (not a usage or configuration error), at most --retries times.",
        f"s2lpo_tasks=({names})",
        "s2lpo_end() {",
        "  local status=$? first='' i log",
        '  for i in "${!pids[@]}"; do if [ "${pids[$i]}" = "${pid:-}" ]; then first=$i; fi; done',
        '  if [ "$status" -eq 0 ]; then return 0; fi',
        '  if [ -n "$first" ]; then',
        '    log=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n "s/^ *StdOut=//p" | head -n1)',
        '    log=$(ls -1t "$(dirname "${log:-.}")"/log-*-"$first"_*.out 2>/dev/null | head -n1)',
        '    echo "s2lpo: the job failed: task $first (${s2lpo_tasks[$first]}) ended first, with status $status;'
        ' the other tasks were stopped. Its log: ${log:-?}" >&2',
        '    if [ -n "$log" ]; then tail -n 20 "$log" | sed "s/^/s2lpo:   | /" >&2; fi',
        "  fi",
        f'  case " {codes} " in *" $status "*)',
        '    echo "s2lpo: status $status is a usage or configuration error: not requeued; fix it and submit again" >&2',
        "    return 0;;",
        "  esac",
        f'  if [ "${{SLURM_RESTART_COUNT:-0}}" -lt {int(max_retries)} ]; then',
        f'    echo "s2lpo: requeueing the job (try $(( ${{SLURM_RESTART_COUNT:-0}} + 2 )) of {int(max_retries) + 1}); '
        'it resumes from the last checkpoint" >&2',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "  fi",
        "}",
        "trap s2lpo_end EXIT",
        "# NeMo-Run's loop stops the other sruns with kill -9; a killed srun makes Slurm SIGKILL its",
        "# tasks at once (no checkpoint, no cleanup, a server's children orphaned). SIGTERM instead:",
        "# srun passes it on, and Slurm sends SIGKILL only KillWait later.",
        'kill() { if [ "${1:-}" = "-9" ]; then shift; command kill -TERM "$@"; else command kill "$@"; fi; }',
    ])
