"""`SGLangEngine`: the `RolloutEngine` for an SGLang server, launched or attached.

It can also score given responses (`score`, a frozen teacher's prefill log-probs; see
scoring.py and sglang_client.parse_score_output).

The trainer is synchronous; the HTTP client is asyncio. The engine owns a private event loop
in a daemon thread: the synchronous methods submit coroutines to it and wait, and
`agenerate` can be awaited from any other event loop. One aiohttp session lives on that loop.

A server the engine launched is restarted when it dies (at most `max_restarts` times): the
client's retry path calls `_recover`, which relaunches the process once for all waiting
requests, waits for /health, replays the last disk weight update, and the failed requests
are resent. Each request is answered exactly once, in order, whatever the server saw.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import threading
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

import torch

from ..config.rollout import EngineConfig
from .engine import Completion, GenerateRequest, parse_weight_version
from .scoring import ScoreRequest, TokenScores
from .sglang_client import EngineRequestError, SGLangClient
from .sglang_server import ServerProcess, build_launch_command, wait_healthy

logger = logging.getLogger(__name__)
T = TypeVar("T")


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

    async def run_async(self, coro: Coroutine[Any, Any, T]) -> T:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


class SGLangEngine:
    """A rollout engine served by `sglang.launch_server` (or a program taking its flags)."""

    def __init__(self, cfg: EngineConfig, *, name: str = "sglang", log_path: str | None = None,
                 backoff_s: float = 0.5) -> None:
        self.cfg = cfg
        self.name = name
        self._restarts = 0
        self._last_disk_update: tuple[str, int] | None = None
        self._lost_tensor_update = False  # weights pushed as tensors die with the server
        self._weights_lost = False  # set by a restart that lost them, cleared by the next sync
        self._offloaded = False  # memory released by `offload`, not yet resumed
        if cfg.url:
            self.url = cfg.url.rstrip("/")
            self.process: ServerProcess | None = None
        else:
            self.url = f"http://{cfg.host}:{cfg.port}"
            self.process = ServerProcess(build_launch_command(cfg), log_path=log_path)
        self._loop = _LoopThread(f"{name}-loop")
        self.client = SGLangClient(
            self.url, api_key=cfg.api_key, max_concurrency=cfg.max_concurrency,
            request_timeout_s=cfg.request_timeout_s, max_retries=cfg.max_retries,
            backoff_s=backoff_s, recover=self._recover)
        self._restart_lock: asyncio.Lock | None = None
        try:
            if self.process is not None:
                self.process.start()
            self._loop.run(wait_healthy(self.client.health, url=self.url,
                                        timeout_s=cfg.startup_timeout_s, process=self.process))
            info = self._loop.run(self.client.get_model_info())
            self._version = parse_weight_version(info.get("weight_version"), where=self.url)
        except BaseException:
            self.close()
            raise

    # ----- RolloutEngine -----

    @property
    def weight_version(self) -> int:
        return self._version

    def generate(self, requests: list[GenerateRequest]) -> list[Completion]:
        self._check_weights()
        self.onload()
        return self._loop.run(self.client.generate(requests))

    async def agenerate(self, requests: list[GenerateRequest]) -> list[Completion]:
        self._check_weights()
        self.onload()
        return await self._loop.run_async(self.client.generate(requests))

    def score(self, requests: list[ScoreRequest]) -> list[TokenScores]:
        """Teacher scores of given responses (prefill only, scoring.py); retried and recovered
        like `generate`."""
        self._check_weights()
        self.onload()
        return self._loop.run(self.client.score(requests))

    def _check_weights(self) -> None:
        if self._weights_lost:
            raise EngineRequestError(
                f"server {self.url} was restarted and lost the weights pushed to it as tensors "
                f"(version {self._version}); sync the weights again before generating")

    def update_weights_from_disk(self, path: str, version: int) -> None:
        """The server reloads every weight from HF directory `path` (a path IT can read)."""
        self._loop.run(self.client.update_weights_from_disk(path, weight_version=str(version)))
        self._version = version
        self._last_disk_update = (path, version)
        self._lost_tensor_update = self._weights_lost = False

    def update_weights_from_tensors(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                                    version: int, flush: bool = True) -> None:
        """Send one bucket of CUDA tensors by CUDA IPC handle (colocated server, same GPU node)."""
        named = list(named_tensors)
        if not torch.cuda.is_available():
            raise NotImplementedError(
                "SGLangEngine.update_weights_from_tensors: the tensor transport passes CUDA IPC "
                "handles and needs CUDA tensors on the server's node; without CUDA use "
                "update_weights_from_disk (sync.transport=disk)")
        cpu = [name for name, t in named if not t.is_cuda]
        if cpu:
            raise ValueError(f"update_weights_from_tensors: tensors {cpu[:3]} are on the CPU; the "
                             "CUDA IPC transport needs CUDA tensors (move them, or use the disk path)")
        payload = _serialize_named_tensors(named)
        self._loop.run(self.client.update_weights_from_tensor(
            [payload] * self.cfg.tp_size, flush_cache=flush, weight_version=str(version)))
        self._version = version
        self._lost_tensor_update = True
        self._weights_lost = False

    def offload(self) -> None:
        """Colocated runs (`enable_memory_saver`): release the server's weights and KV cache so
        the learner can train on the same GPUs. A no-op for servers on their own GPUs."""
        if self.cfg.enable_memory_saver and not self._offloaded:
            self.release_memory_occupation()
            self._offloaded = True

    def onload(self) -> None:
        """Resume the memory released by `offload` (before the next weight update)."""
        if self._offloaded:
            self.resume_memory_occupation()
            self._offloaded = False

    def health(self) -> bool:
        if self.process is not None and not self.process.alive():
            return False
        return self._loop.run(self.client.health())

    def close(self) -> None:
        loop = getattr(self, "_loop", None)
        if loop is not None and not loop.loop.is_closed():
            try:
                loop.run(self.client.close())
            finally:
                loop.stop()
        if self.process is not None:
            self.process.stop()

    # ----- other SGLang endpoints (synchronous) -----

    def health_generate(self) -> bool:
        return self._loop.run(self.client.health_generate())

    def flush_cache(self) -> str:
        return self._loop.run(self.client.flush_cache())

    def get_model_info(self) -> dict:
        return self._loop.run(self.client.get_model_info())

    def pause_generation(self, mode: str = "abort") -> dict:
        return self._loop.run(self.client.pause_generation(mode))

    def continue_generation(self) -> dict:
        return self._loop.run(self.client.continue_generation())

    def release_memory_occupation(self, tags: list[str] | None = None) -> Any:
        return self._loop.run(self.client.release_memory_occupation(tags))

    def resume_memory_occupation(self, tags: list[str] | None = None) -> Any:
        return self._loop.run(self.client.resume_memory_occupation(tags))

    def init_weights_update_group(self, **kwargs: Any) -> dict:
        return self._loop.run(self.client.init_weights_update_group(**kwargs))

    def update_weights_from_distributed(self, *, names: list[str], dtypes: list[str],
                                        shapes: list[list[int]], version: int,
                                        group_name: str = "weight_update_group",
                                        flush: bool = True) -> dict:
        """Announce one NCCL broadcast bucket; the caller broadcasts the tensors meanwhile."""
        out = self._loop.run(self.client.update_weights_from_distributed(
            names=names, dtypes=dtypes, shapes=shapes, group_name=group_name, flush_cache=flush,
            weight_version=str(version)))
        self._version = version
        self._lost_tensor_update = True
        self._weights_lost = False
        return out

    # ----- restart -----

    async def _recover(self) -> None:
        """Before a retry: if the launched server died, relaunch it (once for all waiters).

        Every failed request passes through the lock, so requests that fail while a restart
        is under way wait for it instead of spending their retries on a closed port.
        """
        if self.process is None:
            return  # attached: nothing to restart, plain retries
        if self._restart_lock is None:
            self._restart_lock = asyncio.Lock()
        async with self._restart_lock:
            self._check_weights()  # every waiter of a restart that lost the weights fails
            if self.process.alive():
                if await self.client.health(timeout_s=2.0):
                    return  # running (restarted by another request, or a 5xx / timeout)
                # A killed server drops its connections a moment before it can be reaped.
                for _ in range(20):
                    await asyncio.sleep(0.1)
                    if not self.process.alive():
                        break
                else:
                    return  # alive but not answering: leave it to the retries
            if self._restarts >= self.cfg.max_restarts:
                raise EngineRequestError(
                    f"server {self.url} died (exit code {self.process.exit_code()}) and was already "
                    f"restarted {self._restarts} time(s) (engine max_restarts): "
                    f"{self.process.describe()}\n--- last log lines ---\n{self.process.log_tail()}")
            self._restarts += 1
            logger.warning("%s: server %s exited with code %s; restarting (%d/%d)", self.name,
                           self.url, self.process.exit_code(), self._restarts, self.cfg.max_restarts)
            self.process.stop()  # reap the group: children of the dead leader may still hold the GPU
            self.process.start()
            await wait_healthy(self.client.health, url=self.url,
                               timeout_s=self.cfg.startup_timeout_s, process=self.process)
            if self._lost_tensor_update:
                self._weights_lost = True
                self._check_weights()
            if self._last_disk_update is not None:
                path, version = self._last_disk_update
                await self.client.update_weights_from_disk(path, weight_version=str(version))

    @property
    def num_restarts(self) -> int:
        return self._restarts


def _serialize_named_tensors(named: list[tuple[str, torch.Tensor]]) -> str:
    """SGLang's MultiprocessingSerializer format: ForkingPickler bytes, base64 for HTTP."""
    from torch.multiprocessing.reductions import ForkingPickler  # registers CUDA IPC reductions

    buf = io.BytesIO()
    ForkingPickler(buf).dump(named)
    return base64.b64encode(buf.getvalue()).decode("ascii")
