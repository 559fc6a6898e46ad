"""Has this run already finished? Exit 0 if its newest checkpoint is its last step, 1 otherwise.

    python -m megatron_s2lpo.launch.run_state CONFIG [section.field=value ...]

The trainer script of a cluster launch asks this before waiting for its servers, so a chained
job that starts after the run finished (`--max-chained-jobs`) ends at once instead of holding
its nodes while servers load. Anything it cannot decide (no checkpoint yet, a multi-stage recipe,
an unreadable config) answers "not finished" and leaves the verdict to the trainer.
"""

from __future__ import annotations

import json
import os
import sys


def finished_step(config: str, overrides: list[str]) -> int | None:
    """The step of the run's newest checkpoint if it is the run's last step, else None."""
    from megatron_s2lpo.config import load_config
    from megatron_s2lpo.learner.checkpoint import STATE_FILE, latest_checkpoint
    from megatron_s2lpo.trainer.run_dir import CHECKPOINT_SUBDIR

    cfg = load_config(config, overrides)
    if cfg.stages:  # each stage keeps its own checkpoints; the stage runner resumes them
        return None
    try:
        path = latest_checkpoint(os.path.join(cfg.run.output_dir, CHECKPOINT_SUBDIR))
        with open(path / STATE_FILE) as f:
            step = int(json.load(f)["step"])
    except (FileNotFoundError, ValueError, KeyError, OSError):
        return None
    return step if step >= cfg.run.num_steps else None


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("usage: python -m megatron_s2lpo.launch.run_state CONFIG [section.field=value ...]", file=sys.stderr)
        return 2
    try:
        step = finished_step(args[0], args[1:])
    except (ValueError, FileNotFoundError) as err:  # the trainer reports the config's problem itself
        print(f"run_state: cannot tell whether the run finished ({err}); starting the trainer", file=sys.stderr)
        return 1
    if step is None:
        return 1
    print(f"run_state: the run finished already (checkpoint of step {step} = run.num_steps); nothing to do")
    return 0


if __name__ == "__main__":
    sys.exit(main())
