"""Start a training command and kill or signal it at a chosen point (shared by the resume tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path


def kill_after_checkpoint(command: list[str], cwd: Path, latest: Path, *, what: str, timeout_s: float,
                          after: str = "") -> None:
    """Run `command` in its own session and SIGKILL the whole group (trainer and reward workers)
    once the checkpoint pointer `latest` holds a checkpoint name other than `after`. Fails if the
    run ends first."""
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while not (latest.is_file() and latest.read_text().strip() not in ("", after)):
            assert proc.poll() is None, f"the run ended before {what}"
            assert time.monotonic() < deadline, f"no {what} within {timeout_s:.0f} s"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def signal_after_lines(command: list[str], cwd: Path, path: Path, *, num_lines: int, sig: int,
                       timeout_s: float) -> tuple[int, str]:
    """Run `command` in its own session, send `sig` to it once `path` (a metrics.jsonl) holds
    `num_lines` lines, i.e. while the next step runs, and wait for it to exit.

    Returns (exit status, output). The whole group is SIGKILLed if it outlives `timeout_s`."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout_s
            while not (path.is_file() and len(path.read_text().splitlines()) >= num_lines):
                assert proc.poll() is None, f"the run ended before writing {num_lines} lines to {path}"
                assert time.monotonic() < deadline, f"no {num_lines} lines in {path} within {timeout_s:.0f} s"
                time.sleep(0.02)
            proc.send_signal(sig)  # the trainer itself (the group leader), as `kill -USR1 <pid>` would
            proc.wait(max(1.0, deadline - time.monotonic()))
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        out.seek(0)
        return proc.returncode, out.read()
