"""Persistent scoring processes with a hard wall-clock timeout per call.

A `WorkerProcess` is one child process (multiprocessing "spawn" context: the trainer has imported
torch and runs threads, so fork is unsafe) that imports the scoring code once, then answers calls
over a pipe: the parent sends (completion, ground_truth), the child replies (status, payload). The
parent waits at most `timeout_s` for the reply and otherwise SIGKILLs the child. SIGKILL is the only
interruption that also reaches sympy inside a long C call (a big-integer power), which a
signal.alarm timeout cannot; it also works from any parent thread.

Ownership: a WorkerProcess is driven by one thread at a time. Other threads may only call
`interrupt()` (a signal, safe at any moment); `kill()` closes the pipe and must come from the owner
or after the owner has stopped.
"""

from __future__ import annotations

import enum
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing import connection as mp_connection
from multiprocessing.context import SpawnContext

# The score function runs in the child; None means "cannot be scored" (e.g. the ground truth does
# not parse), which the parent reports as 0.0 and counts as an error.
ScoreFn = Callable[[str, str], "float | None"]

_READY = "ready"
_START_FAILED = "start-failed"
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class CallStatus(enum.Enum):
    OK = "ok"  # the score function returned a reward
    UNSCORABLE = "unscorable"  # it returned None
    ERROR = "error"  # it raised; the payload is the traceback's last line
    TIMEOUT = "timeout"  # no reply within the timeout; the caller must kill the worker
    DIED = "died"  # the worker exited or was killed before replying


class WorkerStartError(RuntimeError):
    """A worker process exited or stayed silent while importing the scoring code."""


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the thread that started it exits.

    Without it a worker stuck in a pathological sympy call outlives a crashed trainer and burns a
    core forever. The 'parent' is the starting THREAD, so only threads that live as long as the
    pool (the scorer's slot threads) may start workers.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return  # best effort: the parent's close() and multiprocessing's atexit still reap workers


def worker_main(conn: mp_connection.Connection, parent_pid: int, score_fn: ScoreFn) -> None:
    """Child process loop: warm up once, then score calls until EOF or a None message."""
    _die_with_parent()
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        return
    # Ctrl-C reaches the whole process group, and a cluster's stop request (SIGUSR1) the whole
    # job step; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        score_fn("1", "1")  # imports math-verify and warms its caches before the first deadline
    except Exception:  # noqa: BLE001 -- reported to the parent, which raises WorkerStartError
        conn.send((_START_FAILED, traceback.format_exc()))
        return
    conn.send((_READY, None))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the parent closed the pipe or died
        if message is None:
            return
        completion, ground_truth = message
        try:
            reward = score_fn(completion, ground_truth)
        except Exception as err:  # noqa: BLE001 -- RecursionError, MemoryError, sympy internals
            conn.send((CallStatus.ERROR.value, f"{type(err).__name__}: {str(err)[:300]}"))
            continue
        if reward is None:
            conn.send((CallStatus.UNSCORABLE.value, None))
        else:
            conn.send((CallStatus.OK.value, float(reward)))


class WorkerProcess:
    """Parent-side handle of one scoring process."""

    def __init__(self, ctx: SpawnContext, score_fn: ScoreFn, name: str) -> None:
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        self._process = ctx.Process(
            target=worker_main, args=(child_conn, os.getpid(), score_fn), name=name, daemon=True
        )
        self._process.start()
        self._pid: int = self._process.pid  # type: ignore[assignment]
        # Drop our copy of the child's end so that the child's death reads as EOF here.
        child_conn.close()
        self._conn = parent_conn
        self._ready = False
        self._ready_lock = threading.Lock()  # wait_ready may come from a waiter and the owner
        self._killed = False

    @property
    def pid(self) -> int:
        return self._pid

    def wait_ready(self, timeout_s: float) -> None:
        """Block until the child has imported the scoring code; WorkerStartError otherwise."""
        with self._ready_lock:
            if not self._ready:
                self._wait_ready_locked(timeout_s)

    def _wait_ready_locked(self, timeout_s: float) -> None:
        if self._killed:
            raise WorkerStartError(f"reward worker {self.pid} was killed")
        ready = mp_connection.wait([self._conn, self._process.sentinel], timeout_s)
        if self._conn in ready:
            try:
                tag, detail = self._conn.recv()
            except (EOFError, OSError):
                tag, detail = None, None
            if tag == _READY:
                self._ready = True
                return
            if tag == _START_FAILED:
                raise WorkerStartError(f"reward worker {self.pid} failed to start:\n{detail}")
        if not ready:
            raise WorkerStartError(
                f"reward worker {self.pid} did not finish importing within {timeout_s:g} s; "
                "raise startup_timeout_s on a heavily loaded machine"
            )
        raise WorkerStartError(
            f"reward worker {self.pid} exited during start-up (exit code "
            f"{self._process.exitcode}); its stderr shows why"
        )

    def call(self, completion: str, ground_truth: str, timeout_s: float) -> tuple[CallStatus, object]:
        """Score one pair; (TIMEOUT, None) if no reply within timeout_s. Requires wait_ready()."""
        assert self._ready, "call() before wait_ready()"
        deadline = time.monotonic() + timeout_s
        try:
            self._conn.send((completion, ground_truth))
        except (OSError, ValueError):  # BrokenPipeError: the child is gone
            return CallStatus.DIED, None
        remaining = max(0.0, deadline - time.monotonic())
        ready = mp_connection.wait([self._conn, self._process.sentinel], remaining)
        if not ready:
            return CallStatus.TIMEOUT, None
        if self._conn not in ready:
            return CallStatus.DIED, None
        try:
            status, payload = self._conn.recv()
        except (EOFError, OSError):
            return CallStatus.DIED, None
        return CallStatus(status), payload

    def interrupt(self) -> None:
        """SIGKILL the child without touching the pipe; safe from any thread at any time."""
        try:
            self._process.kill()
        except ValueError:
            pass  # the owner has already reaped and closed it

    def kill(self) -> None:
        """SIGKILL, reap (no zombie) and release the pipe. Idempotent; owner thread only."""
        if self._killed:
            return
        self._process.kill()  # first, so that a thread blocked in wait_ready wakes up
        with self._ready_lock:
            self._process.join()
            self._conn.close()
            self._process.close()
            self._killed = True
