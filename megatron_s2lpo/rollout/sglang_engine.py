"""`SGLangEngine`: the `RolloutEngine` of a pool of SGLang servers, launched or attached.

Each replica (sglang_replica.py) is one whole server. Requests go, one /generate each, to the
available replica with the fewest requests in flight. A request whose attempt fails (the
replica died, hung, answered 5xx or a broken body) is resubmitted with a fresh rid, on any
available replica, after the failed one was dealt with (restarted, or marked down): each
request is answered exactly once, in order, by one submission that ran to completion.

Weight updates (`paused`, `weight_update_session`, the update methods) reach every replica.
While weights change, generation is paused on every replica in SGLang's `abort` mode
(`/pause_generation` {mode: abort}: the tokenizer manager aborts every running request and
holds new ones until `/continue_generation`; SGLang 0.5.23 `managers/tokenizer_manager.py`,
`pause_generation`). Requests aborted by such a pause come back here and are resubmitted once
generation continues, so every completion was produced, start to end, by ONE weight version
(its `weight_version`). The other modes keep requests on the server: `retract` recomputes
their KV cache under the new weights and `in_place` resumes them with the old KV cache, so a
completion would mix tokens of two versions; neither is used. Pausing and updating from
another thread while `generate` runs is supported: both run on the engine's event loop.

The engine owns a private event loop in a daemon thread: synchronous methods submit coroutines
to it and wait, `agenerate` can be awaited from any other event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
from collections.abc import Coroutine, Iterable, Iterator
from typing import Any, TypeVar

import torch

from ..config.rollout import EngineConfig
from ..types import FinishReason
from . import sglang_tensors
from .engine import Completion, GenerateRequest
from .scoring import ScoreRequest, TokenScores
from .sglang_client import AttemptFailed, EngineRequestError, RequestAborted, gather_all, wire_rid
from .sglang_replica import Replica

logger = logging.getLogger(__name__)
T = TypeVar("T")
CLEANUP_TIMEOUT_S = 10.0  # ending a session / continuing after a failed update


class _LoopThread:
    """An asyncio event loop running forever in a daemon thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self.thread:
            raise RuntimeError("a synchronous engine method was called from the engine's own loop")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def run_async(self, coro: Coroutine[Any, Any, T]) -> T:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


class SGLangEngine:
    """A rollout engine served by `cfg.replicas` launched servers or the attached `cfg.urls`.

    name: for logs and errors (replicas are `name[i]`). log_path: one replica's log file;
    log_dir (default `cfg.log_dir`): `<name>-<i>.log` per replica; neither: temporary files,
    removed by `close`. seed: the run seed (launched replica i gets --random-seed seed + i).
    """

    def __init__(self, cfg: EngineConfig, *, name: str = "sglang", log_path: str | None = None,
                 log_dir: str | None = None, seed: int | None = None, backoff_s: float = 0.5) -> None:
        self.cfg = cfg
        self.name = name
        self.backoff_s = backoff_s
        urls = cfg.replica_urls()
        log_dir = log_dir if log_dir is not None else cfg.log_dir
        if log_path is not None and len(urls) > 1:
            raise ValueError("log_path names one file; give log_dir for an engine with several replicas")
        logs = [log_path if log_path is not None else
                os.path.join(log_dir, f"{name}-{i}.log") if log_dir else None for i in range(len(urls))]
        self._loop = _LoopThread(f"{name}-loop")
        self.replicas = [Replica(cfg, i, engine_name=name, url=url, log_path=logs[i], seed=seed,
                                 backoff_s=backoff_s) for i, url in enumerate(urls)]
        self._version = 0
        self._epoch = 0  # pauses so far: a request aborted during one of them is resubmitted
        self._pause_depth = 0
        self._session_depth = 0
        self._running: asyncio.Event | None = None
        self._changed: asyncio.Condition | None = None
        self._broken: str | None = None  # why generation is refused (a failed weight update)
        self._offloaded = False
        self.num_resubmitted = 0  # requests aborted by a weight-update pause and sent again
        try:
            self._loop.run(self._start())
        except BaseException:
            self.close()
            raise

    async def _start(self) -> None:
        self._running = asyncio.Event()
        self._running.set()
        self._changed = asyncio.Condition()
        await asyncio.gather(*(r.start() for r in self.replicas))
        versions = {r.version for r in self.replicas}
        if len(versions) > 1:
            raise ValueError(f"the replicas of engine {self.name} report different weight versions "
                             f"{ {r.name: r.version for r in self.replicas} }; attach replicas that serve the same weights")
        self._version = versions.pop()
        paths = {r.model_path for r in self.replicas}
        if len(paths) > 1:
            logger.warning("the replicas of engine %s serve different model paths %s; the weight-parity check "
                           "will tell whether their weights differ",
                           self.name, {r.name: r.model_path for r in self.replicas})

    # ----- compatibility with one-server callers -----

    @property
    def url(self) -> str:
        return self.replicas[0].url

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    @property
    def process(self) -> Any:
        return self.replicas[0].process

    @property
    def num_restarts(self) -> int:
        return sum(r.restarts for r in self.replicas)

    # ----- RolloutEngine -----

    @property
    def weight_version(self) -> int:
        return self._version

    def generate(self, requests: list[GenerateRequest]) -> list[Completion]:
        self.onload()
        return self._loop.run(self._serve_all(requests, "generate"))

    async def agenerate(self, requests: list[GenerateRequest]) -> list[Completion]:
        self.onload()
        return await self._loop.run_async(self._serve_all(requests, "generate"))

    def score(self, requests: list[ScoreRequest]) -> list[TokenScores]:
        """Teacher scores of given responses (prefill only, scoring.py); retried and resubmitted
        like `generate`."""
        self.onload()
        return self._loop.run(self._serve_all(requests, "score"))

    def health(self) -> bool:
        """Every replica that is not out for good answers /health."""
        async def probe() -> list[bool]:
            return list(await asyncio.gather(*(r.client.health() for r in self.replicas if r.failed is None)))

        return all(self._loop.run(probe()))

    def close(self) -> None:
        loop = getattr(self, "_loop", None)
        if loop is not None and not loop.loop.is_closed():
            try:
                loop.run(self._close_clients())
            finally:
                loop.stop()
        processes = [r.process for r in getattr(self, "replicas", []) if r.process is not None]
        if processes:  # in parallel: each may take its SIGTERM grace period
            with concurrent.futures.ThreadPoolExecutor(len(processes)) as pool:
                list(pool.map(lambda p: p.stop(remove_log=True), processes))

    async def _close_clients(self) -> None:
        await asyncio.gather(*(r.close() for r in self.replicas), return_exceptions=True)

    # ----- dispatch -----

    async def _serve_all(self, requests: list, op: str) -> list:
        return await gather_all([self._serve(req, op) for req in requests])

    def _current(self, replica: Replica) -> bool:
        return replica.live and replica.version == self._version

    async def _acquire(self) -> Replica:
        """The replica on the engine's weight version with the fewest requests in flight (waits
        while generation is paused and while replicas restart).

        Attached replicas cannot be restarted: when every replica still in the pool is an attached
        server that does not answer /health, a request waits at most `cfg.unavailable_timeout_s`
        for one to come back, then fails naming each replica (launched replicas end their restart
        within startup_timeout_s, back or out of the pool, so they need no deadline here)."""
        loop = asyncio.get_running_loop()
        down_since: float | None = None
        while True:
            await self._running.wait()
            if self._broken:
                raise EngineRequestError(self._broken)
            ready = [r for r in self.replicas if self._current(r)]
            if ready:
                replica = min(ready, key=lambda r: (r.outstanding, r.index))
                replica.outstanding += 1
                return replica
            if all(r.failed for r in self.replicas):
                raise EngineRequestError(f"no replica of engine {self.name} can serve: " +
                                         "; ".join(f"{r.describe()}: {r.failed}" for r in self.replicas))
            if all(r.failed or (r.live and r.version != self._version) for r in self.replicas):
                raise EngineRequestError(
                    f"every replica of engine {self.name} serves other weights than version {self._version} "
                    f"({ {r.name: r.version for r in self.replicas if r.live} }): restarted servers lose weights "
                    "pushed as tensors; sync the weights again before generating")
            if all(r.failed or (r.process is None and not r.healthy) for r in self.replicas):
                down_since = loop.time() if down_since is None else down_since
                if loop.time() - down_since > self.cfg.unavailable_timeout_s:
                    raise EngineRequestError(
                        f"no replica of engine {self.name} answered /health for {self.cfg.unavailable_timeout_s:g} s "
                        "(engine unavailable_timeout_s): " + "; ".join(
                            f"{r.describe()}: {r.failed or 'attached, not answering /health'}" for r in self.replicas)
                        + "; restart the attached server(s) and resume the run, or launch them from the recipe "
                        "(no url) so that the engine restarts them")
            else:
                down_since = None
            async with self._changed:  # a replica restarting or coming back
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout=0.5)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _serve(self, req: Any, op: str) -> Any:
        """One request to completion: resubmitted (fresh rid) after failures and pause aborts."""
        submission = failures = 0
        while True:
            replica = await self._acquire()
            epoch, generation = self._epoch, replica.num_starts
            rid = wire_rid(req.request_id, submission)
            submission += 1
            try:
                if op == "generate":
                    result = await replica.client.generate_once(req, rid)
                else:
                    result = await replica.client.score_once(req, rid)
            except AttemptFailed as err:
                failures += 1
                await self._after_failure(replica, err, rid, generation)
                if failures > self.cfg.max_retries:
                    raise EngineRequestError(
                        f"POST {replica.url}/generate (request {req.request_id}, rid {rid}) failed after {failures} "
                        f"attempt(s) on engine {self.name}; last answer: {err.answer}") from None
                await asyncio.sleep(replica.client.backoff(failures))
                continue
            except RequestAborted:
                if self._epoch != epoch or not self._running.is_set():
                    self.num_resubmitted += 1
                    continue  # aborted by our weight-update pause
                raise
            finally:
                replica.outstanding -= 1
            if op == "generate" and result.finish_reason is FinishReason.ABORT and (
                    self._epoch != epoch or not self._running.is_set()):
                self.num_resubmitted += 1
                continue
            return result

    async def _after_failure(self, replica: Replica, err: AttemptFailed, rid: str, generation: int) -> None:
        try:
            await replica.on_failure(err.kind, rid, generation)
        except Exception as fatal:  # noqa: BLE001 - this replica is out; the others carry on
            replica.healthy = False
            replica.failed = str(fatal)
            logger.error("%s is out of the pool: %s", replica.describe(), fatal)
        await self._notify()

    # ----- pauses and weight-update sessions (every replica) -----

    async def _each(self, fn, replicas: list[Replica] | None = None, *, quiet: bool = False) -> list:
        targets = [r for r in (replicas or self.replicas) if r.failed is None]
        results = await asyncio.gather(*(fn(r) for r in targets), return_exceptions=True)
        errors = [(r, e) for r, e in zip(targets, results) if isinstance(e, BaseException)]
        if errors and not quiet:
            r, e = errors[0]
            raise type(e)(f"{r.describe()}: {e}") if isinstance(e, EngineRequestError) else e
        return results

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Generation paused on every replica (abort mode) for the duration of the block.

        Requests aborted by it are resubmitted afterwards. If the block fails, generation is
        refused (`generate` raises with the failure) until a later update succeeds: the
        replicas may hold partly updated weights."""
        if self._pause_depth:  # nested (an update inside a sync's pause)
            self._pause_depth += 1
            try:
                yield
            finally:
                self._pause_depth -= 1
            return
        self._pause_depth = 1
        paused = False
        try:
            self._loop.run(self._pause())
            paused = True
            yield
        except BaseException as err:
            if paused:
                self._broken = (f"the last weight update of engine {self.name} failed, so its replicas may hold "
                                f"partly updated weights ({type(err).__name__}: {err}); sync the weights again "
                                "before generating")
            raise
        else:
            self._broken = None
        finally:
            self._pause_depth = 0
            self._loop.run(self._continue(quiet=self._broken is not None or not paused))

    async def _pause(self) -> None:
        self._epoch += 1
        self._running.clear()
        await self._each(lambda r: r.client.pause_generation("abort"), [r for r in self.replicas if r.live])

    async def _continue(self, *, quiet: bool = False) -> None:
        try:
            await self._each(lambda r: r.client.continue_generation(), [r for r in self.replicas if r.live],
                             quiet=quiet)
        finally:
            self._running.set()
            await self._notify()

    def pause_generation(self) -> None:
        """Pause every replica (abort mode) until `continue_generation`."""
        self._pause_depth += 1
        if self._pause_depth == 1:
            self._loop.run(self._pause())

    def continue_generation(self) -> None:
        self._pause_depth = max(0, self._pause_depth - 1)
        if self._pause_depth == 0:
            self._loop.run(self._continue())

    @contextlib.contextmanager
    def weight_update_session(self, version: int) -> Iterator[list[Replica]]:
        """/begin_weight_update on every replica, the block, /end_weight_update on every replica.

        SGLang 0.5.23 refuses tensor and distributed updates outside such a session
        (`SchedulerWeightUpdaterManager`: "must run between begin_weight_update() and
        end_weight_update()"). Runs inside `paused()` (opened here if not yet). The session is
        ended on every replica even when the block fails (bounded wait, errors logged), then
        the block's error is raised. On success every replica holds `version`."""
        with self.paused():
            targets = self.live_replicas()
            self._loop.run(self._each(lambda r: r.client.begin_weight_update(), targets))
            self._session_depth += 1
            try:
                yield targets
            except BaseException:
                self._session_depth -= 1
                self._loop.run(self._each(lambda r: r.client.end_weight_update(timeout_s=CLEANUP_TIMEOUT_S),
                                          targets, quiet=True))
                raise
            self._session_depth -= 1
            self._loop.run(self._each(lambda r: r.client.end_weight_update(), targets))
            self._set_weights(version, targets)

    def live_replicas(self) -> list[Replica]:
        """The replicas a weight update reaches: up and not out for good."""
        return [r for r in self.replicas if r.live]

    def _set_weights(self, version: int, targets: list[Replica], path: str | None = None) -> None:
        for replica in targets:
            replica.version = version
            replica.last_disk_update = (path, version) if path is not None else None
        self._version = version

    # ----- weight updates -----

    def update_weights_from_disk(self, path: str, version: int) -> None:
        """Every replica reloads every weight from HF directory `path` (a path IT can read), in
        parallel, generation paused meanwhile."""
        with self.paused():
            targets = self.live_replicas()
            self._loop.run(self._each(
                lambda r: r.client.update_weights_from_disk(path, weight_version=str(version)), targets))
            self._set_weights(version, targets, path=path)

    def update_weights_from_tensors(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int,
                                    flush: bool = True, *, cpu_sharing: str | None = None) -> None:
        """Send one bucket of CUDA tensors to every replica by CUDA IPC handle (colocated servers):
        one flattened bucket, serialized once per TP rank (sglang_tensors.py). Needs an open
        `weight_update_session` (one is opened for this bucket alone otherwise)."""
        named = list(named_tensors)
        if not torch.cuda.is_available() and cpu_sharing is None:
            raise NotImplementedError(
                "SGLangEngine.update_weights_from_tensors: the tensor transport passes CUDA IPC handles and needs "
                "CUDA tensors on the server's node; without CUDA use update_weights_from_disk (sync.transport=disk)")
        cpu = [name for name, t in named if not t.is_cuda]
        if cpu and cpu_sharing is None:
            raise ValueError(f"update_weights_from_tensors: tensors {cpu[:3]} are on the CPU; the CUDA IPC transport "
                             "needs CUDA tensors (move them, or use the disk path)")
        if self._session_depth == 0:
            with self.weight_update_session(version):
                self.update_weights_from_tensors(named, version, flush, cpu_sharing=cpu_sharing)
            return
        flat, metadata = sglang_tensors.pack_bucket(named)
        targets = self.live_replicas()

        async def post(r: Replica) -> Any:
            payloads = sglang_tensors.serialize_per_rank(flat, metadata, r.tp_size or self.cfg.tp_size,
                                                         cpu_sharing=cpu_sharing)
            return await r.client.update_weights_from_tensor(payloads, load_format=sglang_tensors.FLATTENED_BUCKET,
                                                             flush_cache=flush, weight_version=str(version))

        self._loop.run(self._each(post, targets))  # `flat` stays alive until every server has answered
        del flat

    def init_weights_update_group(self, replica: Replica, **body: Any) -> dict:
        return self._loop.run(replica.client.init_weights_update_group(**body))

    def submit_init_weights_update_group(self, replica: Replica, **body: Any) -> concurrent.futures.Future:
        """The call on the engine's loop; the caller joins the rendezvous meanwhile."""
        return self._loop.submit(replica.client.init_weights_update_group(**body))

    def submit_update_weights_from_distributed(self, replicas: list[Replica], **body: Any) -> concurrent.futures.Future:
        """POST /update_weights_from_distributed to every replica at once; the future fails as
        soon as one replica refuses (the caller then stops waiting for its broadcast)."""
        async def all_of() -> list:
            tasks = {asyncio.ensure_future(r.client.update_weights_from_distributed(**body)): r for r in replicas}
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    if task.exception() is not None:
                        raise EngineRequestError(f"{tasks[task].describe()}: {task.exception()}")
            finally:
                for task in tasks:  # after a refusal the others may wait on a broadcast that never completes
                    task.cancel()
            return [task.result() for task in tasks]

        return self._loop.submit(all_of())

    def destroy_weights_update_group(self, group_name: str, replicas: list[Replica] | None = None) -> None:
        self._loop.run(self._each(lambda r: r.client.destroy_weights_update_group(
            group_name, timeout_s=CLEANUP_TIMEOUT_S), replicas, quiet=True))

    def replica_versions(self) -> dict[str, int]:
        """The weight version each replica's /model_info reports, by replica name."""
        from .engine import parse_weight_version

        live = self.live_replicas()
        infos = self._loop.run(self._each(lambda r: r.client.model_info(), live))
        return {r.name: parse_weight_version(i.get("weight_version"), where=r.describe()) for r, i in zip(live, infos)}

    def replica_engine(self, index: int) -> "ReplicaView":
        """A generate-only view of the `index`-th live replica, modulo their number (the weight-parity
        check rotates over the replicas; one that is down, e.g. an attached server that died and was
        left out of the last update, is skipped)."""
        live = self.live_replicas() or self.replicas
        return ReplicaView(self, live[index % len(live)])

    # ----- memory (colocated servers) -----

    def offload(self) -> None:
        """Colocated runs (`enable_memory_saver`): release every replica's weights and KV cache so
        the learner can train on the same GPUs. A no-op for servers on their own GPUs.

        SGLang asserts the scheduler is idle (`release_memory_occupation`): each replica's cache is
        flushed first, retried until the flush succeeds (it refuses while requests run), at most
        `request_timeout_s`."""
        if self.cfg.enable_memory_saver and not self._offloaded:
            self._loop.run(self._each(self._release))
            self._offloaded = True

    async def _release(self, r: Replica) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.request_timeout_s
        while True:
            try:
                await r.client.flush_cache()
                break
            except EngineRequestError as err:
                if loop.time() > deadline:
                    raise EngineRequestError(f"{r.describe()} never became idle for a memory release within "
                                             f"{self.cfg.request_timeout_s:g} s: {err}") from None
                await asyncio.sleep(0.2)
        await r.client.release_memory_occupation()

    def onload(self) -> None:
        """Resume the memory released by `offload` (before the next weight update or generation)."""
        if self._offloaded:
            self._loop.run(self._each(lambda r: r.client.resume_memory_occupation()))
            self._offloaded = False

    # ----- other SGLang endpoints (first replica; synchronous) -----

    def health_generate(self) -> bool:
        return self._loop.run(self.replicas[0].client.health_generate())

    def flush_cache(self) -> str:
        return self._loop.run(self.replicas[0].client.flush_cache())

    def get_model_info(self) -> dict:
        """/model_info of the first replica (`replica_versions` reads every replica's version)."""
        return self._loop.run(self.replicas[0].client.model_info())

    def release_memory_occupation(self, tags: list[str] | None = None) -> Any:
        return self._loop.run(self._each(lambda r: r.client.release_memory_occupation(tags)))

    def resume_memory_occupation(self, tags: list[str] | None = None) -> Any:
        return self._loop.run(self._each(lambda r: r.client.resume_memory_occupation(tags)))


class ReplicaView:
    """One replica of an `SGLangEngine` as a generate-only engine (named after the replica)."""

    def __init__(self, engine: SGLangEngine, replica: Replica) -> None:
        self.engine = engine
        self.replica = replica
        self.name = replica.name
        self.url = replica.url

    @property
    def weight_version(self) -> int:
        return self.replica.version

    def generate(self, requests: list[GenerateRequest]) -> list[Completion]:
        async def run() -> list[Completion]:
            return list(await asyncio.gather(*(self.replica.client.generate_once(r) for r in requests)))

        return self.engine._loop.run(run())
