"""Run a training command, or kill or signal it at a chosen point, and compare what two runs logged
(shared by the training and resume tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path


def run_ok(command: list[str], cwd: Path, *, timeout_s: float) -> subprocess.CompletedProcess:
    """Run `command` to its end; fails with the tails of its output unless it exits 0."""
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def without_timing(record: dict) -> dict:
    """A metrics record without its wall-clock entries (`time/...`), which no two runs share."""
    return {k: v for k, v in record.items() if not k.startswith("time/")}


def group_members(pgid: int) -> list[str]:
    """Live (not zombie) processes of process group `pgid`, as 'pid: command line'."""
    import psutil

    out = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(f"{proc.pid}: {' '.join(proc.info['cmdline'] or [])[:160]}")
        except (ProcessLookupError, psutil.Error):
            continue
    return out


def kill_after_checkpoint(command: list[str], cwd: Path, latest: Path, *, what: str, timeout_s: float,
                          after: str = "", trainer_only: bool = False) -> list[str]:
    """Run `command` in its own session and SIGKILL it once the checkpoint pointer `latest` holds a
    checkpoint name other than `after`. Fails if the run ends first.

    trainer_only: SIGKILL the trainer process alone (as the OOM killer does) and return what of
    its process group is still alive 5 s later (reward workers, checkpoint helpers, resource
    trackers: all should have died with it); otherwise SIGKILL the whole group. Survivors are
    killed before returning either way."""
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    survivors: list[str] = []
    try:
        deadline = time.monotonic() + timeout_s
        while not (latest.is_file() and latest.read_text().strip() not in ("", after)):
            assert proc.poll() is None, f"the run ended before {what}"
            assert time.monotonic() < deadline, f"no {what} within {timeout_s:.0f} s"
            time.sleep(0.02)
        if trainer_only:
            proc.kill()
            proc.wait()
            settle = time.monotonic() + 5.0
            while (survivors := group_members(proc.pid)) and time.monotonic() < settle:
                time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # nothing of the group was left to kill
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return survivors


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


def kill_on_output(command: list[str], cwd: Path, pattern: str, *, timeout_s: float) -> tuple[str, str]:
    """Run `command` in its own session and SIGKILL its whole group as soon as a line of its
    standard output matches the regular expression `pattern` (the trainer prints and flushes a
    line as each phase begins). Returns (the matching line, the output up to it); fails if the run
    ends or `timeout_s` passes first."""
    import queue
    import re
    import threading

    regex = re.compile(pattern)
    lines: queue.Queue = queue.Queue()
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)

    def read() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no output line matching {pattern!r} within {timeout_s:.0f} s") from None
            assert line is not None, (f"the run ended before printing a line matching {pattern!r}:\n"
                                      + "".join(seen[-40:]))
            if regex.search(line):
                os.killpg(proc.pid, signal.SIGKILL)
                return line.strip(), "".join(seen)
            seen.append(line)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        reader.join(timeout=10)
