"""Start a training command and SIGKILL it at a chosen point (shared by the resume tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def kill_after_checkpoint(command: list[str], cwd: Path, latest: Path, *, what: str, timeout_s: float) -> None:
    """Run `command` in its own session and SIGKILL the whole group (trainer and reward workers)
    once the checkpoint pointer `latest` holds a checkpoint name. Fails if the run ends first."""
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while not (latest.is_file() and latest.read_text().strip()):
            assert proc.poll() is None, f"the run ended before {what}"
            assert time.monotonic() < deadline, f"no {what} within {timeout_s:.0f} s"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
