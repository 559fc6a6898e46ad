"""Whether a run directory may hold a new run, or continue the run it holds.

A run directory is *used* once a run left results in it: any `checkpoints/step_*` directory
(complete, unfinished `.tmp-step_*`, or damaged), a `checkpoints/latest` pointer, or a
`metrics.jsonl` with at least one record. Cached models under `models/` do not count.

  new run (run.resume=false)   an unused directory starts at step 1; a used one is refused.
  --resume (run.resume=true)   an unused directory starts at step 1; a used one continues from
                               its newest loadable checkpoint, or is refused with a list of what
                               it holds when none loads. Nothing is deleted or truncated first.

So no run ever starts over on top of another run's results; only metrics lines of steps after
the checkpoint being resumed are dropped (they are logged again as those steps rerun). A
checkpoint is a resume point only if its trainer state holds what the loop continues from
(`check_trainer_state`); one that does not is skipped like a damaged one.

One run at a time: `hold_run_dir` takes an exclusive `flock` on `<output_dir>/run.lock` for the
life of the run (global rank 0 only; the other ranks of a torchrun job belong to it). A second
run into the same directory, or `--resume` while the first is alive, is refused naming the
holder. The kernel releases the lock when the holding process dies, however it dies (SIGKILL,
OOM, a node reboot for a local disk), so a crashed run never leaves it stuck; the file itself
stays and is reused. On a filesystem without `flock` (some NFS/Lustre mounts) the run warns and
proceeds unlocked.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

CHECKPOINT_SUBDIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"  # written by metrics.MetricsWriter
LOCK_FILE = "run.lock"
_STEP_DIR = re.compile(r"^(\.tmp-)?step_\d{8}$")

logger = logging.getLogger(__name__)


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


def check_output_dir(output_dir: str | os.PathLike) -> None:
    """ValueError for an output directory no run can use: a dangling or looping symlink, a file, or a
    `checkpoints` entry that is not a directory."""
    out = Path(output_dir)
    for path, what in ((out, "run.output_dir"), (out / CHECKPOINT_SUBDIR, f"run.output_dir's {CHECKPOINT_SUBDIR}")):
        try:
            os.stat(path)  # follows symlinks
        except FileNotFoundError:
            if os.path.islink(path):
                raise ValueError(f"{what} {path} is a symlink to {os.readlink(path)}, which does not exist; create "
                                 "that directory or point the setting elsewhere") from None
            continue
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise ValueError(f"{what} {path} is a symlink loop ({os.readlink(path)}); point it at a real "
                                 "directory") from None
            if err.errno in (errno.ENOTDIR,):
                raise ValueError(f"{what} {path}: a part of the path is a file, not a directory") from None
            raise
        if not path.is_dir():
            raise ValueError(f"{what} {path} is a file, not a directory; move it away or choose another "
                             "run.output_dir")


def check_trainer_state(state: dict, checkpoint: Path | None = None) -> None:
    """ValueError unless `state` (a checkpoint's trainer state) holds what a resume continues from:
    the step, the sampler position and the cumulative counters."""
    missing = [key for key in ("step", "sampler", "cumulative") if key not in state]
    if missing:
        raise ValueError(f"the trainer state lacks {missing}: not a checkpoint this trainer can continue from")
    sampler, cumulative = state["sampler"], state["cumulative"]
    if not isinstance(state["step"], int) or isinstance(state["step"], bool):
        raise ValueError(f"the trainer state's step is {state['step']!r}, not an integer")
    if not isinstance(sampler, dict) or not all(isinstance(sampler.get(k), int) for k in ("epoch", "position")):
        raise ValueError(f"the trainer state's sampler is {str(sampler)[:200]}, not a sampler position "
                         "(epoch and position)")
    if not isinstance(cumulative, dict) or not all(isinstance(v, (int, float)) for v in cumulative.values()):
        raise ValueError("the trainer state's cumulative counters are not numbers")


def resume_point(output_dir: str | os.PathLike, *, resume: bool) -> Path | None:
    """Refuse (ValueError) what would start a run over on top of another; the checkpoint the run
    continues from (the newest loadable one), or None when it starts at step 1."""
    from megatron_s2lpo.learner.checkpoint import loadable_checkpoints

    check_output_dir(output_dir)
    found = run_traces(output_dir)
    if not found:
        return None
    listing = "; ".join(found)
    if not resume:
        raise ValueError(f"{output_dir} already holds a run ({listing}); pass --resume (run.resume=true) to "
                         "continue it, or choose another run.output_dir")
    root = Path(output_dir) / CHECKPOINT_SUBDIR
    path, skipped = loadable_checkpoints(root, state_check=check_trainer_state) if root.is_dir() else (None, [])
    for bad, reason in skipped:
        logger.warning("checkpoint %s cannot be loaded (%s); %s", bad, reason,
                       f"falling back to {path.name}" if path is not None else "no older checkpoint to fall back to")
    if path is not None:
        return path
    why = "".join(f"\n  {bad.name} cannot be loaded: {reason}" for bad, reason in skipped)
    raise ValueError(f"--resume: {output_dir} holds a run but no checkpoint that can be loaded, so it can neither "
                     f"be continued nor started over without destroying what is there. Found: {listing}{why}\n"
                     "Restore a complete checkpoint there, or choose another run.output_dir (or remove this "
                     "directory yourself to start from step 1).")


def check_run_dir(output_dir: str | os.PathLike, *, resume: bool) -> bool:
    """Refuse (ValueError) what would start a run over on top of another; True when the run must
    continue from a checkpoint of `output_dir`, False when it starts at step 1."""
    return resume_point(output_dir, resume=resume) is not None


# ----------------------------------------------------------------------------- one run at a time


def is_launch_rank0() -> bool:
    """Global rank 0 of a torchrun job, or a process outside one (torch.distributed may not be up yet)."""
    return int(os.environ.get("RANK", "0")) == 0


class RunDirLock:
    """The lock `hold_run_dir` holds; `record_holder()` writes who holds it, once the run is allowed
    to use the directory (a refused run rewrites nothing there)."""

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path = path
        self._fd = fd

    def record_holder(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode() + b"\n", 0)


@contextlib.contextmanager
def hold_run_dir(output_dir: str | os.PathLike) -> Iterator[RunDirLock]:
    """Hold the run directory's lock while inside (module docstring); ValueError if a live run holds it."""
    out = Path(output_dir)
    if not is_launch_rank0():
        yield RunDirLock(out / LOCK_FILE, None)
        return
    import fcntl

    check_output_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        locked = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{out} is in use by a live run ({_holder(out / LOCK_FILE)}); wait for it to end or "
                             "stop it (a second run, or --resume, into the same run.output_dir would interleave "
                             "their checkpoints and metrics), or choose another run.output_dir") from None
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            logger.warning("cannot lock %s (%s: the filesystem does not support flock); a second run into this "
                           "directory will not be refused", out / LOCK_FILE, err)
            locked = False
        yield RunDirLock(out / LOCK_FILE, fd if locked else None)
    finally:
        os.close(fd)  # releases the lock (the kernel does the same when the process dies)


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):  # still checking the directory, or an old file
        return f"it holds {path}"
