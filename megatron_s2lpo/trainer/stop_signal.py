"""Stop a run at a step boundary when asked: SIGUSR1 or SIGTERM -> finish the step, save, exit "continue".

A cluster job asks ahead of its time limit (`#SBATCH --signal=B:USR1@<seconds>`, docs/cluster.md),
a preempting scheduler sends SIGTERM, and a user can send either (`kill -USR1 <trainer pid>`).
The handler only records the request; the loop asks `stop_requested()` after each step (every
rank asks, and all agree, so every rank stops after the same step), checkpoints that step and
raises `RunStopped`. `s2lpo train` then exits with CONTINUE_EXIT_CODE: the run is not finished,
`--resume` continues it exactly from the checkpoint.

    @stop_on_signal()                      # handlers live while train() runs (main thread only)
    def train(cfg): ...
        stopping = stop_requested()        # in the loop, after the step's metrics
        if save or stopping: save(step)
        if stopping: raise RunStopped(step)

Under torchrun a worker's non-zero exit is reported as the agent's own failure (exit 1), so a
launcher that runs the trainer under torchrun sets $S2LPO_STOP_MARKER to a file path: the trainer
then writes the stopped step there and exits 0, and the launch script reads the marker.

Every stop signal is recorded. A second one, sent at least REPEAT_AFTER_S seconds after the first,
means "stop now" (a step that does not finish: a server that vanished, a hung peer): the handler
raises `RunInterrupted` in the main thread, which interrupts any wait, the run closes its engines
and exits with 128 + the signal number, without saving; `--resume` continues from the newest
checkpoint. Signals closer together are one request delivered twice (a shell or `scancel`
signalling the whole process group while a launcher forwards the same signal). A third one ends
the process by the signal itself, wherever it is stuck.

The reward workers (reward/_worker.py) ignore these signals, so a signal to the whole process
group (Ctrl-C in a shell group, `scancel`, preemption) stops the trainer at a step boundary
without killing them mid-step.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator

CONTINUE_EXIT_CODE = 75  # sysexits EX_TEMPFAIL: not done yet; run again with --resume to continue
STOP_MARKER_ENV = "S2LPO_STOP_MARKER"
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
REPEAT_AFTER_S = 2.0  # a stop signal this long after the first is a second request: stop now

# One request per process: a staged run nests train() calls, and all of them see the same request.
_received: list[int] = []  # every stop signal, in order
_requests: list[float] = []  # monotonic times of the distinct requests (signals REPEAT_AFTER_S apart)
_depth = 0


class RunStopped(Exception):
    """The run stopped on request after checkpointing `step`; resuming continues from there."""

    def __init__(self, step: int, signum: int) -> None:
        super().__init__(f"stopped on {signal.Signals(signum).name} after step {step}, which is checkpointed; "
                         "run again with --resume (run.resume=true) to continue")
        self.step = step
        self.signum = signum

    def exit_code(self) -> int:
        """CONTINUE_EXIT_CODE, or 0 after writing $S2LPO_STOP_MARKER when the launcher set it."""
        marker = os.environ.get(STOP_MARKER_ENV, "")
        if not marker:
            return CONTINUE_EXIT_CODE
        tmp = f"{marker}.{os.getpid()}.tmp"  # every rank of the node writes the same marker
        with open(tmp, "w") as f:
            f.write(f"{self.step}\n")
        os.replace(tmp, marker)
        return 0


class RunInterrupted(BaseException):
    """A stop signal repeated: the run stops at once, without a checkpoint of the current step.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped at once on a repeated {signal.Signals(signum).name}, without saving the current "
                         "step; run again with --resume (run.resume=true) to continue from the newest checkpoint")
        self.signum = signum

    def exit_code(self) -> int:
        return 128 + self.signum


def _record(signum: int, _frame: object) -> None:
    _received.append(signum)
    now = time.monotonic()
    name = signal.Signals(signum).name
    if _requests and now - _requests[-1] < REPEAT_AFTER_S:
        return  # the same request, delivered again
    _requests.append(now)
    # os.write, not print: the main thread may be inside a print when the handler runs
    if len(_requests) == 1:
        os.write(2, f"\n{name}: finishing the current step, then saving a checkpoint and stopping (send it again "
                    "to stop at once without saving)\n".encode())
        return
    if len(_requests) == 2:
        os.write(2, f"\n{name} again: stopping now, without saving the current step (once more ends the process "
                    "at once)\n".encode())
        raise RunInterrupted(signum)
    os.write(2, f"\n{name} a third time: ending the process\n".encode())
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


@contextlib.contextmanager
def stop_on_signal() -> Iterator[None]:
    """Record SIGUSR1 / SIGTERM instead of dying while inside (usable as a decorator).

    Signal handlers exist only in the main thread; elsewhere (a notebook worker thread, a test
    runner's thread) this does nothing and the signals keep their usual effect.
    """
    global _depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS} if _depth == 0 else {}
    if _depth == 0:
        _received.clear()
        _requests.clear()
        for s in STOP_SIGNALS:
            signal.signal(s, _record)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: set outside Python


def stop_requested() -> bool:
    """True if any rank received a stop signal (collective under torch.distributed: every rank must
    call it at the same point of the loop)."""
    from megatron_s2lpo.utils.procs import on_any_rank

    return on_any_rank(bool(_received))


def received_signal() -> int:
    """The first stop signal this process received (SIGUSR1 when the request came from another rank)."""
    return _received[0] if _received else int(signal.SIGUSR1)


def received_signals() -> list[int]:
    """Every stop signal this process received while handlers were installed, in order."""
    return list(_received)
