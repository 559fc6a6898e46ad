"""A child started in its own session, handled as its whole process group (no torch: the
launcher's supervisor imports this before anything heavy)."""

from __future__ import annotations

import os
import signal
import subprocess


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    """`sig` to every process of `proc`'s group (started with start_new_session=True); none left is fine."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_group(proc: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM the group and wait for its leader; SIGKILL the group after `timeout_s`, or at once
    when the leader is already gone (its children may not be)."""
    if proc.poll() is None:
        signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            signal_group(proc, signal.SIGKILL)
            proc.wait(timeout_s)
    else:
        signal_group(proc, signal.SIGKILL)


def log_tail(path: str | None, num_lines: int = 30) -> str:
    """The last `num_lines` lines of the log at `path` (its last 64 KiB read), or "(no log)"."""
    try:
        with open(path or "", "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 64 * 1024))
            lines = f.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-num_lines:])
