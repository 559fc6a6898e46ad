"""Asynchronous checkpoint saves: megatron's async dist_checkpointing with our atomic commit.

    saves = AsyncSaves()
    save_checkpoint(root, step, ..., async_saves=saves)   # returns once the state is staged
    ...                                                   # training goes on
    saves.finish(blocking=False)                          # every rank: commits it if all writes are done
    saves.finish(blocking=True)                           # before a load, the next save, the run's end

`dist_checkpointing.save(..., async_sharded_save=True)` plans the save, writes the small common
state, stages the shards in host memory (a copy of GPU tensors; on the CPU the forked writer's
copy-on-write pages are the snapshot) and returns an `AsyncRequest`; megatron's
`AsyncCallsQueue` forks a writer process for it (`TemporalAsyncCaller`) and, once every rank's
writer has exited, runs the finalize functions: megatron's (gather the write results, write the
global metadata; a failure raises on every rank) and then ours, the commit (COMPLETE, rename of
`.tmp-<step>/`, `latest`). Until that commit the checkpoint is a `.tmp-*` directory that no load
considers, so a kill at any point before it leaves the previous checkpoint as the latest.

One save is in flight at a time: a new save, a load and the end of the run finish the pending one
first. A failed write or commit removes the partial directory and raises CheckpointSaveError on
every rank, as a synchronous save does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .checkpoint_files import CheckpointSaveError


@dataclass(kw_only=True, slots=True)
class _Pending:
    tmp: Path
    step: int
    final: Path


class AsyncSaves:
    """At most one asynchronous save in flight, committed by `finish` (collective)."""

    def __init__(self) -> None:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self._queue = AsyncCallsQueue(persistent=False)  # a forked writer per save, gone after it
        self._pending: _Pending | None = None

    @property
    def in_flight(self) -> Path | None:
        """Where the pending save will be once committed; None when nothing is pending."""
        return self._pending.final if self._pending is not None else None

    def writer_pids(self) -> list[int]:
        """Process ids of the writers still running on this rank (for tests and diagnostics)."""
        return [call.async_caller.process.pid for call in self._queue.async_calls
                if getattr(call.async_caller, "process", None) is not None]

    def schedule(self, request: Any, *, commit: Callable[[], None], tmp: Path, step: int, final: Path) -> None:
        """Start writing `request` (every rank); `commit` runs on every rank after all writes."""
        if self._pending is not None:
            raise RuntimeError(f"a checkpoint save ({self._pending.final}) is still in flight; finish it first")
        request.add_finalize_fn(commit)
        self._pending = _Pending(tmp=tmp, step=step, final=final)
        self._queue.schedule_async_request(request)

    def finish(self, *, blocking: bool) -> Path | None:
        """Commit the pending save if every rank's writer is done (blocking: wait for them).
        Returns the committed directory, or None when nothing was committed. Collective."""
        from .checkpoint import _abandon_save

        if self._pending is None:
            return None
        pending = self._pending
        try:
            done = self._queue.maybe_finalize_async_calls(blocking=blocking)
        except CheckpointSaveError:  # the commit failed: already cleaned up and agreed on every rank
            self._pending = None
            raise
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # a writer failed: megatron raises it on every rank
            self._pending = None
            _abandon_save(pending.tmp, pending.step, err)
        if not done:
            return None
        self._pending = None
        return pending.final
