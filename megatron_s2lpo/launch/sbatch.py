"""Pieces of the sbatch script NeMo-Run writes for a run that NeMo-Run has no option for.

- exported values are quoted (NeMo-Run 0.11.1 writes `export KEY=value` as given);
- the batch shell passes Slurm's early SIGUSR1 (`--signal=B:USR1@<lead>`) to the trainer's srun,
  which hands it to every process of the trainer's step (srun forwards SIGUSR1; slurmstepd
  signals the step's whole process container), and the trainer stops after a checkpoint;
- raw `--sbatch-arg`s become `#SBATCH` lines, refusing the ones the launcher sets itself.
"""

from __future__ import annotations

import shlex

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


def stop_signal_trap(trainer_index: int) -> str:
    """Batch-shell lines: on SIGUSR1 (Slurm's early warning), signal the trainer's srun.

    `pids[i]` is the array NeMo-Run's sbatch template fills with each srun's pid in task order; the
    trap body is expanded when the signal arrives, after the sruns started.
    """
    return "\n".join([
        "# Slurm signals this shell ahead of the time limit (--signal=B:USR1@...): the trainer finishes",
        "# its step, checkpoints it and exits; the job ends, and a chained job resumes the run.",
        "s2lpo_stop_trainer() {",
        '  echo "s2lpo: time limit near: asking the trainer to checkpoint and stop at $(date)"',
        f'  kill -USR1 "${{pids[{trainer_index}]}}" 2>/dev/null || true',
        "}",
        "trap s2lpo_stop_trainer USR1",
    ])
