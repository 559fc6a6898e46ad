r"""Math answer rewards with math-verify, under a hard per-call timeout in worker processes.

What is compared: the content of the LAST `\boxed{...}` / `\fbox{...}` of the completion (see
`format.extract_last_boxed`), or, when the completion has no box at all, whatever math-verify's own
default extraction finds in the text. A completion whose last box is never closed has no answer.
The ground truth is parsed the same way as box content, so `3/4`, `0.75`, `\frac{3}{4}`, `[1,2)`,
`$\frac34$` and `\boxed{3/4}` are all valid ground truths.

Why processes: math-verify's own timeouts use signal.alarm, which raises ValueError outside the
main thread and cannot interrupt sympy inside a C call (e.g. `9^{9^{9^{9}}}` never returns). So
every call runs in a persistent worker process (`python -m megatron_s2lpo.reward.math_worker`,
see _worker.py: a fresh interpreter, so any caller works and none is re-imported) with
math-verify's timeouts switched off; a worker that overruns `timeout_s` is SIGKILLed and
replaced (by a pre-started spare, so the next call does not wait for the 0.7 s import), and that
completion gets 0.0. `batch_timeout_s` bounds a whole batch the same way: what is not scored by
then gets 0.0, so a batch of degenerate completions costs at most that long.

    with MathScorer(num_workers=2, timeout_s=5.0, batch_timeout_s=120.0) as scorer:
        rewards = scorer.score(completions, ground_truths)      # blocking, order preserved
        future = scorer.submit(completions, ground_truths)      # overlap with generation
        ...; rewards = future.result()   # or: await asyncio.wrap_future(future)

`math_reward(completion, ground_truth)` is the plain-function form; it routes through a lazily
created module-level scorer (1 worker) that is closed at interpreter exit, so it is safe to call
from any thread.

Inputs are not pre-filtered or truncated: the hard timeout already bounds their cost, and every
cheap filter considered (length caps, "has a digit") would change some correct result.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace

from megatron_s2lpo.reward._worker import CallStatus, WorkerProcess, WorkerStartError
from megatron_s2lpo.reward.format import count_boxes, extract_last_boxed

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0
_MATH_DELIMITERS = (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$"))
_MAX_WARNED_TRUTHS = 1000
_MAX_OUTSIDE_STOPS = 3  # workers killed by a stop signal from outside before a batch gives up (no reward)
# Every open scorer, closed at interpreter exit so that no worker process outlives the interpreter.
_open_scorers: weakref.WeakSet = weakref.WeakSet()


# ---------------------------------------------------------------------------------------------
# In-process scoring: runs inside the worker processes (main thread, no timeout of its own).
# ---------------------------------------------------------------------------------------------


@functools.cache
def _math_verify():
    """Import math-verify once per process (0.7 s) and quiet its 'timeout is disabled' warning."""
    import math_verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return math_verify


def _parse_box_content(latex: str) -> list:
    """Parse one answer given as LaTeX box content; [] if math-verify finds nothing."""
    mv = _math_verify()
    config = [mv.LatexExtractionConfig(boxed_match_priority=0)]
    # Timeouts off: they rely on signal.alarm; the worker's hard timeout bounds the call.
    return mv.parse("\\boxed{" + latex + "}", extraction_config=config, parsing_timeout=None)


def ground_truth_latex(ground_truth: str) -> str:
    r"""The LaTeX answer inside a ground-truth string: last box content, or math delimiters removed.

    >>> ground_truth_latex(r"$\frac{3}{4}$")
    '\\frac{3}{4}'
    >>> ground_truth_latex(r"\boxed{[1,2)}"), ground_truth_latex(" 7 ")
    ('[1,2)', '7')
    """
    text = ground_truth.strip()
    boxed = extract_last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    for left, right in _MATH_DELIMITERS:
        if len(text) > len(left) + len(right) and text.startswith(left) and text.endswith(right):
            return text[len(left) : -len(right)].strip()
    return text


@functools.lru_cache(maxsize=4096)
def _parse_ground_truth(ground_truth: str) -> tuple:
    # Cached: every completion of a GRPO group shares one ground truth. A tuple, so the cached
    # value cannot be mutated by a caller.
    return tuple(_parse_box_content(ground_truth_latex(ground_truth)))


def score_math_in_process(completion: str, ground_truth: str) -> float | None:
    r"""math-verify score in THIS process with no timeout; None if the ground truth does not parse.

    Meant for the scorer's worker processes (and debugging): it can run forever on adversarial
    input, so training code calls `MathScorer` or `math_reward` instead.
    """
    gold = _parse_ground_truth(ground_truth)
    if not gold:
        return None
    content = extract_last_boxed(completion)
    if content is not None:
        target = _parse_box_content(content) if content.strip() else []
    elif count_boxes(completion) > 0:
        target = []  # the final box is never closed: no answer, even if an earlier box is complete
    else:
        target = _math_verify().parse(completion, parsing_timeout=None)
    if not target:
        return 0.0
    return 1.0 if _math_verify().verify(list(gold), target, timeout_seconds=None) else 0.0


# ---------------------------------------------------------------------------------------------
# The scorer: a queue of (completion, ground truth) items served by one thread per worker.
# ---------------------------------------------------------------------------------------------


@dataclass(kw_only=True, slots=True)
class ScorerStats:
    """Counters since the scorer started; every completion lands in exactly one of the first three.

    num_errors: math-verify raised, the ground truth did not parse, or the completion killed two
    workers in a row. Timeouts and errors both get reward 0.0.
    """

    num_scored: int = 0  # rewards math-verify produced within the timeout
    num_timeouts: int = 0  # calls killed at timeout_s, or unscored when their batch's deadline passed
    num_errors: int = 0
    num_worker_restarts: int = 0  # workers replaced after a timeout or an unexpected death
    num_past_deadline: int = 0  # of num_timeouts: completions cut or skipped by batch_timeout_s


class ScorerClosedError(RuntimeError):
    """The scorer was closed (or broke) before this batch was scored."""


class WorkersStoppedError(RuntimeError):
    """Stop signals from outside kept killing the workers scoring a batch (it fails, unscored)."""


class _Batch:
    """Rewards of one submit() call, filled in any order by the slot threads."""

    __slots__ = ("future", "rewards", "num_left", "lock", "deadline", "warned")

    def __init__(self, size: int, deadline: float | None = None) -> None:
        self.deadline = deadline  # time.monotonic() past which its items get 0.0 unscored
        self.warned = False
        self.future: Future[list[float]] = Future()
        self.future.set_running_or_notify_cancel()  # running from the start: cannot be cancelled
        self.rewards = [0.0] * size
        self.num_left = size
        self.lock = threading.Lock()

    def deliver(self, index: int, reward: float) -> None:
        with self.lock:
            if self.future.done():
                return
            self.rewards[index] = reward
            self.num_left -= 1
            if self.num_left == 0:
                self.future.set_result(self.rewards)

    def fail(self, error: BaseException) -> None:
        with self.lock:
            if not self.future.done():
                self.future.set_exception(error)


@dataclass(kw_only=True, slots=True)
class _Item:
    batch: _Batch
    index: int
    completion: str
    ground_truth: str


def _check_inputs(completions: Sequence[str], ground_truths: Sequence[str]) -> None:
    if len(completions) != len(ground_truths):
        raise ValueError(
            f"MathScorer: {len(completions)} completions but {len(ground_truths)} ground truths; "
            "pass one ground truth per completion"
        )
    for row, (completion, truth) in enumerate(zip(completions, ground_truths)):
        if not isinstance(completion, str):
            raise ValueError(f"MathScorer: completions[{row}] is {type(completion).__name__}, not str")
        if not isinstance(truth, str) or not truth.strip():
            raise ValueError(
                f"MathScorer: ground_truths[{row}] is {truth!r}; every row needs a non-empty answer "
                "string (fix or drop that row in the dataset)"
            )


class MathScorer:
    """Batched math-verify scoring over persistent worker processes with a hard timeout per call.

    Args:
        num_workers: scoring processes (each scores one completion at a time).
        timeout_s: wall-clock limit per completion; past it the worker is killed, reward 0.0.
        batch_timeout_s: wall-clock limit per submitted batch, from submit(); completions not
            scored by then get 0.0 (counted as timeouts). None: no limit.
        num_spare_workers: pre-started processes that replace killed ones without waiting for
            math-verify's import, so a timeout costs only its own timeout_s.
        startup_timeout_s: how long a new worker may take to import math-verify before the
            scorer gives up (raises WorkerStartError in pending and later calls).

    Construction returns at once; workers start in the background. `with MathScorer(...) as s:`
    waits until all workers are ready and closes them on exit. Thread-safe: any thread may
    call `score`/`submit`.
    """

    def __init__(
        self,
        num_workers: int = 2,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        *,
        batch_timeout_s: float | None = None,
        num_spare_workers: int = 1,
        startup_timeout_s: float = 120.0,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"MathScorer: num_workers={num_workers}; need at least 1")
        if not timeout_s > 0:
            raise ValueError(f"MathScorer: timeout_s={timeout_s}; need a positive number of seconds")
        if batch_timeout_s is not None and not batch_timeout_s > 0:
            raise ValueError(f"MathScorer: batch_timeout_s={batch_timeout_s}; need a positive number of seconds "
                             "or None")
        if num_spare_workers < 0:
            raise ValueError(f"MathScorer: num_spare_workers={num_spare_workers}; need 0 or more")
        if not startup_timeout_s > 0:
            raise ValueError(f"MathScorer: startup_timeout_s={startup_timeout_s}; need > 0")
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.batch_timeout_s = None if batch_timeout_s is None else float(batch_timeout_s)
        self.num_spare_workers = num_spare_workers
        self.startup_timeout_s = float(startup_timeout_s)
        self._cond = threading.Condition()
        self._queue: deque[_Item] = deque()
        self._closed = False
        self._broken: BaseException | None = None
        self._stats = ScorerStats()
        self._processes: set[WorkerProcess] = set()  # every started, not yet reaped worker
        self._spares: list[WorkerProcess] = []
        self._num_spares_starting = 0
        self._current: dict[int, WorkerProcess] = {}  # slot -> its worker
        self._warned_truths: set[str] = set()
        self._threads = [
            threading.Thread(target=self._slot_loop, args=(slot,), name=f"math-scorer-{slot}", daemon=True)
            for slot in range(num_workers)
        ]
        _open_scorers.add(self)
        for thread in self._threads:
            thread.start()

    # -- public API ------------------------------------------------------------------------------

    def submit(self, completions: Sequence[str], ground_truths: Sequence[str]) -> Future[list[float]]:
        """Queue a batch; the future resolves to rewards in input order (0.0 / 1.0 each)."""
        _check_inputs(completions, ground_truths)
        deadline = None if self.batch_timeout_s is None else time.monotonic() + self.batch_timeout_s
        batch = _Batch(len(completions), deadline)
        if not completions:
            batch.future.set_result([])
            return batch.future
        items = [
            _Item(batch=batch, index=i, completion=c, ground_truth=t)
            for i, (c, t) in enumerate(zip(completions, ground_truths))
        ]
        with self._cond:
            self._raise_if_unusable()
            self._queue.extend(items)
            self._cond.notify_all()
        return batch.future

    def score(self, completions: Sequence[str], ground_truths: Sequence[str]) -> list[float]:
        """Rewards for a batch, in input order; blocks until all are scored or timed out."""
        return self.submit(completions, ground_truths).result()

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until every slot has a ready worker and every spare has imported math-verify.

        After a timeout the slot swaps in a spare at once and starts a new spare in the
        background; this waits for that too (benchmarks and tests use it to exclude start-up).
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            with self._cond:
                self._raise_if_unusable()
                workers = list(self._current.values()) + list(self._spares)
                complete = (
                    len(self._current) == self.num_workers
                    and len(self._spares) >= self.num_spare_workers
                )
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"MathScorer workers not ready after {timeout_s} s")
            if complete:
                try:
                    for worker in workers:
                        worker.wait_ready(self.startup_timeout_s if remaining is None else remaining)
                except WorkerStartError:
                    with self._cond:
                        self._raise_if_unusable()  # closed meanwhile: say so instead
                    raise
                return
            time.sleep(0.02)

    def stats(self) -> ScorerStats:
        """A snapshot of the counters."""
        with self._cond:
            return replace(self._stats)

    @property
    def num_scored(self) -> int:
        return self.stats().num_scored

    @property
    def num_timeouts(self) -> int:
        return self.stats().num_timeouts

    @property
    def num_errors(self) -> int:
        return self.stats().num_errors

    def worker_pids(self, *, include_spares: bool = False) -> list[int]:
        """Pids of the workers currently serving slots, in slot order (then the spares')."""
        with self._cond:
            workers = [self._current[slot] for slot in sorted(self._current)]
            if include_spares:
                workers += self._spares
            return [worker.pid for worker in workers]

    def close(self) -> None:
        """Stop everything: unfinished batches fail, every worker is killed and reaped. Idempotent."""
        with self._cond:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            processes = list(self._processes)
            self._cond.notify_all()
        error = ScorerClosedError("MathScorer was closed before this batch was scored")
        for item in pending:
            item.batch.fail(error)
        for process in processes:
            process.interrupt()  # unblocks slot threads waiting on a call or a start-up
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()
        with self._cond:
            processes = list(self._processes)
            self._processes.clear()
            self._spares.clear()
            self._current.clear()
        for process in processes:  # slot threads have stopped: nobody else owns these now
            process.kill()

    def __enter__(self) -> MathScorer:
        try:
            self.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- slot threads ------------------------------------------------------------------------------

    def _raise_if_unusable(self) -> None:
        if self._broken is not None:
            raise ScorerClosedError(f"MathScorer is unusable: {self._broken}") from self._broken
        if self._closed:
            raise ScorerClosedError("MathScorer is closed")

    def _slot_loop(self, slot: int) -> None:
        try:
            while True:
                # (Re)start before idling: a killed worker is replaced before the next item arrives.
                self._ensure_worker(slot)
                item = self._next_item()
                if item is None:
                    break
                try:
                    reward = self._score_item(slot, item)
                except WorkersStoppedError as err:
                    item.batch.fail(err)  # no reward at all rather than a wrong one; the slot goes on
                    continue
                except BaseException as err:
                    item.batch.fail(ScorerClosedError("MathScorer was closed") if self._closed else err)
                    raise
                item.batch.deliver(item.index, reward)
        except ScorerClosedError:
            pass
        except Exception as err:  # noqa: BLE001 -- a worker cannot start (or a bug): stop loudly,
            # failing every queued batch, rather than leave callers waiting on a dead slot.
            if not self._closed:
                self._break(err)
        finally:
            self._retire(slot, restart=False)

    def _next_item(self) -> _Item | None:
        with self._cond:
            while not self._queue and not self._closed and self._broken is None:
                self._cond.wait()
            if self._closed or self._broken is not None:
                return None
            return self._queue.popleft()

    def _past_deadline(self, item: _Item) -> float:
        """0.0 for an item whose batch ran out of time, counted and warned about once per batch."""
        with self._cond:
            self._stats.num_timeouts += 1
            self._stats.num_past_deadline += 1
            warn, item.batch.warned = not item.batch.warned, True
        if warn:
            logger.warning("MathScorer: a batch of %d completions passed its batch_timeout_s=%g s; completions "
                           "not scored by then get reward 0.0 (raise reward.batch_timeout_s or "
                           "run.reward_workers)", len(item.batch.rewards), self.batch_timeout_s)
        return 0.0

    def _call_timeout(self, item: _Item) -> float:
        """timeout_s, or less when the batch's deadline comes first (<= 0: no time left)."""
        if item.batch.deadline is None:
            return self.timeout_s
        return min(self.timeout_s, item.batch.deadline - time.monotonic())

    def _score_item(self, slot: int, item: _Item) -> float:
        deaths = outside = 0
        while deaths < 2:  # a worker that dies unexpectedly gets one retry on a fresh worker
            timeout_s = self._call_timeout(item)
            if timeout_s <= 0:
                return self._past_deadline(item)
            worker = self._ensure_worker(slot)
            status, payload = worker.call(item.completion, item.ground_truth, timeout_s)
            if status is CallStatus.OK:
                self._count("num_scored")
                return float(payload)  # type: ignore[arg-type]
            if status in (CallStatus.ERROR, CallStatus.UNSCORABLE):
                self._count("num_errors")
                self._warn_unscored(item, status, payload)
                return 0.0
            # A stop signal from outside says nothing about the completion: never scored 0.0 for it.
            stopped = status is CallStatus.DIED and worker.stopped_from_outside()
            # TIMEOUT or DIED: the worker is unusable; kill, reap and replace it.
            self._retire(slot, restart=True)
            if self._closed:
                raise ScorerClosedError("MathScorer was closed")
            if stopped:
                outside += 1
                if outside > _MAX_OUTSIDE_STOPS:
                    raise WorkersStoppedError(f"MathScorer: {outside} workers in a row were killed by a stop signal "
                                              "sent from outside while scoring a completion; it is not scored")
                continue
            deaths += 1
            if status is CallStatus.TIMEOUT:
                if timeout_s < self.timeout_s:  # cut by the batch's deadline, not its own limit
                    return self._past_deadline(item)
                self._count("num_timeouts")
                return 0.0
        self._count("num_errors")
        logger.warning("MathScorer: a completion killed two workers in a row; reward 0.0")
        return 0.0

    def _ensure_worker(self, slot: int) -> WorkerProcess:
        """The slot's ready worker: the current one, else a spare, else a freshly started one."""
        with self._cond:
            if slot in self._current:
                return self._current[slot]
            spare = self._spares.pop(0) if self._spares else None
        self._top_up_spares()
        # A spare that died while waiting is dropped; a fresh worker that fails to start (killed
        # from outside, say) gets one more try; a second failure means start-up itself is broken.
        candidates = ([spare] if spare is not None else []) + [None, None]
        for attempt, candidate in enumerate(candidates):
            worker = candidate if candidate is not None else self._start_process()
            try:
                worker.wait_ready(self.startup_timeout_s)
            except WorkerStartError:
                self._discard(worker)
                if self._closed:
                    raise ScorerClosedError("MathScorer was closed") from None
                if attempt == len(candidates) - 1:
                    raise
                continue
            with self._cond:
                self._current[slot] = worker
            return worker
        raise AssertionError("unreachable")

    def _top_up_spares(self) -> None:
        with self._cond:
            num_missing = self.num_spare_workers - len(self._spares) - self._num_spares_starting
            self._num_spares_starting += max(0, num_missing)
        for started in range(max(0, num_missing)):
            try:
                spare = self._start_process()
            except BaseException:
                with self._cond:
                    self._num_spares_starting -= num_missing - started
                raise
            with self._cond:
                self._spares.append(spare)
                self._num_spares_starting -= 1

    def _start_process(self) -> WorkerProcess:
        # Started from a slot thread on purpose: workers die with the thread that started them.
        worker = WorkerProcess("megatron_s2lpo.reward.math_worker", name="math-verify-worker")
        with self._cond:
            if not self._closed:
                self._processes.add(worker)
                return worker
        worker.kill()
        raise ScorerClosedError("MathScorer was closed")

    def _discard(self, worker: WorkerProcess) -> None:
        worker.kill()
        with self._cond:
            self._processes.discard(worker)

    def _retire(self, slot: int, *, restart: bool) -> None:
        """Kill and reap the slot's current worker (if any)."""
        with self._cond:
            worker = self._current.pop(slot, None)
            if worker is not None and restart:
                self._stats.num_worker_restarts += 1
        if worker is not None:
            self._discard(worker)

    def _break(self, error: BaseException) -> None:
        logger.error("MathScorer stopped, failing all pending batches: %r", error)
        with self._cond:
            self._broken = error
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for item in pending:
            item.batch.fail(ScorerClosedError(f"MathScorer is unusable: {error}"))

    def _count(self, name: str) -> None:
        with self._cond:
            setattr(self._stats, name, getattr(self._stats, name) + 1)

    def _warn_unscored(self, item: _Item, status: CallStatus, payload: object) -> None:
        with self._cond:
            if item.ground_truth in self._warned_truths or len(self._warned_truths) >= _MAX_WARNED_TRUTHS:
                return
            self._warned_truths.add(item.ground_truth)
        if status is CallStatus.UNSCORABLE:
            logger.warning("math-verify cannot parse ground truth %r; its rewards are 0.0", item.ground_truth)
        else:
            logger.warning("math-verify raised %s (ground truth %r); reward 0.0", payload, item.ground_truth)


# ---------------------------------------------------------------------------------------------
# The plain reward function and its module-level scorer.
# ---------------------------------------------------------------------------------------------

_default_lock = threading.Lock()
_default_scorer: MathScorer | None = None


def default_scorer() -> MathScorer:
    """The scorer behind `math_reward`: created on first use (1 worker), closed at exit."""
    global _default_scorer
    with _default_lock:
        if _default_scorer is None:
            _default_scorer = MathScorer(num_workers=1, timeout_s=DEFAULT_TIMEOUT_S)
        return _default_scorer


def shutdown_default_scorer() -> None:
    """Close the module-level scorer (a later `math_reward` call starts a new one)."""
    global _default_scorer
    with _default_lock:
        scorer, _default_scorer = _default_scorer, None
    if scorer is not None:
        scorer.close()


def _close_open_scorers() -> None:
    shutdown_default_scorer()
    for scorer in list(_open_scorers):
        scorer.close()


def _forget_scorers_in_child() -> None:
    # A forked child inherits the objects but not their threads; closing them there would
    # SIGKILL the parent's workers. Forget them; math_reward starts afresh in the child.
    global _default_scorer, _default_lock, _open_scorers
    _default_lock = threading.Lock()
    _default_scorer = None
    _open_scorers = weakref.WeakSet()


atexit.register(_close_open_scorers)
os.register_at_fork(after_in_child=_forget_scorers_in_child)


def math_reward(completion: str, ground_truth: str) -> float:
    r"""1.0 if the completion's final answer equals `ground_truth` under math-verify, else 0.0.

    Safe from any thread, a notebook or a script without a main guard; each call runs in the
    module's worker process under a hard timeout of DEFAULT_TIMEOUT_S (5 s) and gets 0.0 when it
    runs past it. For batches (and other timeouts) use `MathScorer`.

    >>> math_reward(r"so $x = \boxed{\dfrac{1}{2}}$", "0.5")
    1.0
    >>> math_reward(r"\boxed{\{2, 1\}}", r"\{1,2\}")
    1.0
    >>> math_reward(r"first \boxed{3}, no wait: \boxed{4}", "3")
    0.0
    >>> math_reward("The answer is 1/2.", r"\frac{1}{2}")
    1.0
    """
    return default_scorer().score([completion], [ground_truth])[0]
