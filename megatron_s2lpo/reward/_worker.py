"""Persistent scoring processes with a hard wall-clock timeout per call.

A `WorkerProcess` is one child process, `python -m megatron_s2lpo.reward.<worker>` started with
`subprocess` (not multiprocessing): a fresh interpreter that imports the scoring code and nothing
of its parent, so a caller without an `if __name__ == "__main__":` guard, a notebook or a thread
can start workers, and no worker ever re-runs the caller's script. The child warms up once, then
answers calls over its stdin/stdout pipes: the parent writes a frame (completion, ground_truth),
the child replies (status, payload). Frames are a 4-byte big-endian length and a JSON body, so
nothing is ever unpickled on either side. The parent waits at most `timeout_s` for the reply and
otherwise SIGKILLs the child. SIGKILL is the only interruption that also reaches sympy inside a
long C call (a big-integer power), which a signal.alarm timeout cannot; it works from any thread.

Stop signals belong to the parent: SIGTERM, SIGINT, SIGHUP and SIGUSR1 sent to the whole process
group (Ctrl-C, `scancel`, a preempting scheduler) would otherwise kill every worker mid-call while
the trainer finishes its step. The child is started with them blocked (the mask is inherited
through fork and exec) and ignores them before unblocking, so none of them can reach it at any
moment of its life; it ends on EOF, on SIGKILL from the parent, or when the parent dies. A worker
that still dies of a signal it did not cause (`DIED` with `stopped_from_outside()`) has said
nothing about its completion, which the scorer then never scores as 0.0.

Ownership: a WorkerProcess is driven by one thread at a time. Other threads may only call
`interrupt()` (a signal, safe at any moment); `kill()` closes the pipes and must come from the
owner or after the owner has stopped.
"""

from __future__ import annotations

import enum
import json
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable

# The score function runs in the child; None means "cannot be scored" (e.g. the ground truth does
# not parse), which the parent reports as 0.0 and counts as an error.
ScoreFn = Callable[[str, str], "float | None"]

# Signals the parent handles (or that end the whole job), never the workers'.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
_READY = "ready"
_START_FAILED = "start-failed"
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_HEADER = struct.Struct(">I")
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class CallStatus(enum.Enum):
    OK = "ok"  # the score function returned a reward
    UNSCORABLE = "unscorable"  # it returned None
    ERROR = "error"  # it raised; the payload is the traceback's last line
    TIMEOUT = "timeout"  # no reply within the timeout; the caller must kill the worker
    DIED = "died"  # the worker exited or was killed before replying


class WorkerStartError(RuntimeError):
    """A worker process exited or stayed silent while importing the scoring code."""


# ----------------------------------------------------------------------------- the child


def _die_with_parent(parent_pid: int) -> bool:
    """Ask Linux to SIGKILL this process when the thread that started it exits; False if the
    parent is already gone.

    Without it a worker stuck in a pathological sympy call outlives a crashed trainer and burns a
    core forever. The 'parent' is the starting THREAD, so only threads that live as long as the
    pool (the scorer's slot threads) may start workers.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # best effort: the parent's close() and the EOF on stdin still end the worker
    return os.getppid() == parent_pid


def _write_frame(fd: int, message: object) -> None:
    body = json.dumps(message).encode()
    data = _HEADER.pack(len(body)) + body
    while data:
        data = data[os.write(fd, data):]


def _read_exact(fd: int, size: int) -> bytes | None:
    """`size` bytes from a blocking fd; None at end of file."""
    chunks, left = [], size
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def serve(score_fn: ScoreFn, argv: list[str] | None = None) -> None:
    """The child's main loop (`python -m megatron_s2lpo.reward.<worker> --parent-pid PID`): warm up
    once, then score calls until EOF or a null frame."""
    args = sys.argv[1:] if argv is None else argv
    parent_pid = int(args[args.index("--parent-pid") + 1]) if "--parent-pid" in args else os.getppid()
    # Frames travel on the original stdout; anything the scoring code prints goes to stderr.
    proto_in, proto_out = os.dup(0), os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    # Ctrl-C, scancel and a cluster's stop request reach the whole process group or job step; the
    # parent decides when workers stop. Blocked since the fork (WorkerProcess), so ignoring them
    # before unblocking leaves no moment at which one could kill this process.
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if not _die_with_parent(parent_pid):
        return  # the parent died before the death signal was armed
    try:
        score_fn("1", "1")  # imports the scoring library and warms its caches before the first deadline
    except Exception:  # noqa: BLE001 -- reported to the parent, which raises WorkerStartError
        _write_frame(proto_out, [_START_FAILED, traceback.format_exc()])
        return
    _write_frame(proto_out, [_READY, None])
    while True:
        header = _read_exact(proto_in, _HEADER.size)
        body = None if header is None else _read_exact(proto_in, _HEADER.unpack(header)[0])
        message = None if body is None else json.loads(body)
        if message is None:
            return  # the parent closed the pipe, died, or said stop
        completion, ground_truth = message
        try:
            reward = score_fn(completion, ground_truth)
        except Exception as err:  # noqa: BLE001 -- RecursionError, MemoryError, sympy internals
            _write_frame(proto_out, [CallStatus.ERROR.value, f"{type(err).__name__}: {str(err)[:300]}"])
            continue
        if reward is None:
            _write_frame(proto_out, [CallStatus.UNSCORABLE.value, None])
        else:
            _write_frame(proto_out, [CallStatus.OK.value, float(reward)])


# ----------------------------------------------------------------------------- the parent


def _child_env() -> dict[str, str]:
    """The caller's environment, with this package importable even from an uninstalled checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_PARENT, env.get("PYTHONPATH")]))
    return env


class WorkerProcess:
    """Parent-side handle of one scoring process running `python -m <module>`."""

    def __init__(self, module: str, name: str) -> None:
        self.name = name
        # the child inherits this thread's signal mask: stop signals stay blocked until it ignores them
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", module, "--parent-pid", str(os.getpid())], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=None, env=_child_env(), bufsize=0, close_fds=True)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        self._pid: int = self._process.pid
        self._in = self._process.stdin.fileno()  # type: ignore[union-attr]
        self._out = self._process.stdout.fileno()  # type: ignore[union-attr]
        self._buffer = b""
        self._ready = False
        self._ready_lock = threading.Lock()  # wait_ready may come from a waiter and the owner
        self._killed = False

    @property
    def pid(self) -> int:
        return self._pid

    def _read_frame(self, deadline: float | None) -> object:
        """The next reply; TimeoutError past `deadline`, EOFError when the child is gone."""
        while True:
            if len(self._buffer) >= _HEADER.size:
                size = _HEADER.unpack(self._buffer[:_HEADER.size])[0]
                if len(self._buffer) >= _HEADER.size + size:
                    body = self._buffer[_HEADER.size:_HEADER.size + size]
                    self._buffer = self._buffer[_HEADER.size + size:]
                    return json.loads(body)
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError
            readable, _, _ = select.select([self._out], [], [], remaining)
            if not readable:
                raise TimeoutError
            chunk = os.read(self._out, 65536)
            if not chunk:
                raise EOFError
            self._buffer += chunk

    def wait_ready(self, timeout_s: float) -> None:
        """Block until the child has imported the scoring code; WorkerStartError otherwise."""
        with self._ready_lock:
            if not self._ready:
                self._wait_ready_locked(timeout_s)

    def _wait_ready_locked(self, timeout_s: float) -> None:
        if self._killed:
            raise WorkerStartError(f"reward worker {self.pid} was killed")
        try:
            tag, detail = self._read_frame(time.monotonic() + timeout_s)  # type: ignore[misc]
        except TimeoutError:
            raise WorkerStartError(
                f"reward worker {self.pid} did not finish importing within {timeout_s:g} s; "
                "raise startup_timeout_s on a heavily loaded machine"
            ) from None
        except (EOFError, OSError, ValueError):
            tag, detail = None, None
        if tag == _READY:
            self._ready = True
            return
        if tag == _START_FAILED:
            raise WorkerStartError(f"reward worker {self.pid} failed to start:\n{detail}")
        raise WorkerStartError(
            f"reward worker {self.pid} exited during start-up (exit code {self._process.poll()}); "
            "its stderr shows why"
        )

    def call(self, completion: str, ground_truth: str, timeout_s: float) -> tuple[CallStatus, object]:
        """Score one pair; (TIMEOUT, None) if no reply within timeout_s. Requires wait_ready()."""
        assert self._ready, "call() before wait_ready()"
        deadline = time.monotonic() + timeout_s
        try:
            _write_frame(self._in, [completion, ground_truth])
        except OSError:  # BrokenPipeError: the child is gone
            return CallStatus.DIED, None
        try:
            status, payload = self._read_frame(deadline)  # type: ignore[misc]
        except TimeoutError:
            return CallStatus.TIMEOUT, None
        except (EOFError, OSError, ValueError):
            return CallStatus.DIED, None
        return CallStatus(status), payload

    def stopped_from_outside(self, wait_s: float = 1.0) -> bool:
        """After a DIED call: True if a stop signal ended the child (not the parent's SIGKILL, not a
        crash of its own), i.e. its death says nothing about the completion it was scoring."""
        if self._killed:
            return False
        try:
            code = self._process.wait(wait_s)
        except subprocess.TimeoutExpired:
            return False
        return code is not None and -code in STOP_SIGNALS

    def interrupt(self) -> None:
        """SIGKILL the child without touching the pipes; safe from any thread at any time."""
        try:
            self._process.kill()  # a no-op once the owner has reaped it
        except OSError:
            pass

    def kill(self) -> None:
        """SIGKILL, reap (no zombie) and release the pipes. Idempotent; owner thread only."""
        if self._killed:
            return
        self.interrupt()  # first, so that a thread blocked in wait_ready wakes up
        with self._ready_lock:
            self._process.wait()
            for pipe in (self._process.stdin, self._process.stdout):
                if pipe is not None:
                    pipe.close()
            self._killed = True
