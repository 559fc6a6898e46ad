"""Whether a run directory may hold a new run, or continue the run it holds.

A run directory is *used* once a run left results in it: any `checkpoints/step_*` directory
(complete, unfinished `.tmp-step_*`, or damaged), a `checkpoints/latest` pointer, or a
`metrics.jsonl` with at least one record. Cached models under `models/` do not count.

  new run (run.resume=false)   an unused directory starts at step 1; a used one is refused.
  --resume (run.resume=true)   an unused directory starts at step 1; a used one continues from
                               its newest loadable checkpoint, or is refused with a list of what
                               it holds when none loads. Nothing is deleted or truncated first.

So no run ever starts over on top of another run's results; only metrics lines of steps after
the checkpoint being resumed are dropped (they are logged again as those steps rerun).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

CHECKPOINT_SUBDIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"  # written by metrics.MetricsWriter
_STEP_DIR = re.compile(r"^(\.tmp-)?step_\d{8}$")


def _metrics_steps(path: Path) -> tuple[int, list[int]]:
    """(number of non-blank lines, the steps they record) of a metrics file."""
    import json

    lines, steps = 0, []
    with open(path, errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            lines += 1
            try:
                steps.append(int(json.loads(line)["step"]))
            except (ValueError, KeyError, TypeError):
                pass  # a line cut by a kill still marks the directory as used
    return lines, steps


def run_traces(output_dir: str | os.PathLike) -> list[str]:
    """What in `output_dir` shows that a run used it (empty: the directory may start a run)."""
    out = Path(output_dir)
    found = []
    metrics = out / METRICS_FILE
    if metrics.is_file():
        lines, steps = _metrics_steps(metrics)
        if lines:
            span = f", steps {min(steps)}-{max(steps)}" if steps else ""
            found.append(f"{METRICS_FILE} with {lines} record(s){span}")
    root = out / CHECKPOINT_SUBDIR
    if root.is_dir():
        for name in sorted(os.listdir(root)):
            if _STEP_DIR.match(name):
                found.append(f"{CHECKPOINT_SUBDIR}/{name}" + (" (an unfinished save)" if name.startswith(".tmp-")
                                                              else ""))
            elif name == "latest":
                found.append(f"{CHECKPOINT_SUBDIR}/latest")
    return found


def check_run_dir(output_dir: str | os.PathLike, *, resume: bool) -> bool:
    """Refuse (ValueError) what would start a run over on top of another; True when the run must
    continue from a checkpoint of `output_dir`, False when it starts at step 1."""
    from megatron_s2lpo.learner.checkpoint import loadable_checkpoints

    found = run_traces(output_dir)
    if not found:
        return False
    listing = "; ".join(found)
    if not resume:
        raise ValueError(f"{output_dir} already holds a run ({listing}); pass --resume (run.resume=true) to "
                         "continue it, or choose another run.output_dir")
    root = Path(output_dir) / CHECKPOINT_SUBDIR
    path, skipped = loadable_checkpoints(root) if root.is_dir() else (None, [])
    if path is not None:
        return True
    why = "".join(f"\n  {bad.name} cannot be loaded: {reason}" for bad, reason in skipped)
    raise ValueError(f"--resume: {output_dir} holds a run but no checkpoint that can be loaded, so it can neither "
                     f"be continued nor started over without destroying what is there. Found: {listing}{why}\n"
                     "Restore a complete checkpoint there, or choose another run.output_dir (or remove this "
                     "directory yourself to start from step 1).")
