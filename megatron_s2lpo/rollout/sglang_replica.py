"""One replica of an SGLang engine: a launched or attached server, its client and its state.

`SGLangEngine` (sglang_engine.py) owns a list of these and runs them on its event loop; every
method here is a coroutine of that loop. A replica knows how to start (launch, or attach and
wait for /health), what it serves (/model_info, /server_info), how many requests it has in
flight, and how to come back after a failure:

- a launched server that died, or hung (a request outlived `hang_timeout_s` while /health still
  answered), is stopped and started again, at most `max_restarts` times; if its weights came
  from disk, that update is replayed; weights pushed as tensors (CUDA IPC / NCCL) died with the
  process, so the replica then reports another version than the engine and serves nothing until
  the next weight sync reaches it (the engine dispatches only to replicas on its version);
- an attached server cannot be restarted: it is marked down and probed in the background until
  /health answers again (then it, too, serves only once it reports the engine's version).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ..config.rollout import EngineConfig
from .engine import parse_weight_version
from .sglang_client import EngineRequestError, SGLangClient
from .sglang_server import ServerProcess, build_launch_command, launch_env, wait_healthy

logger = logging.getLogger(__name__)


class Replica:
    """One SGLang server of an engine (index `index`)."""

    def __init__(self, cfg: EngineConfig, index: int, *, engine_name: str, url: str,
                 log_path: str | None, seed: int | None, backoff_s: float) -> None:
        self.cfg = cfg
        self.index = index
        self.name = f"{engine_name}[{index}]"
        self.url = url
        self.process: ServerProcess | None = None
        if not cfg.attached:
            self.process = ServerProcess(build_launch_command(cfg, replica=index, seed=seed, name=engine_name),
                                         log_path=log_path,
                                         env=launch_env(cfg))
        self.client = SGLangClient(url, api_key=cfg.api_key, max_concurrency=cfg.max_concurrency,
                                   request_timeout_s=cfg.request_timeout_s, hang_timeout_s=cfg.hang_timeout_s,
                                   max_retries=cfg.max_retries, backoff_s=backoff_s, recover=self.recover_if_dead)
        self.healthy = False
        self.failed: str | None = None  # why it is out of the pool for good (restart budget spent, ...)
        self.outstanding = 0  # requests in flight
        self.num_starts = 0  # launches (launched) or successful attaches; a new value = a new process
        self.restarts = 0
        self.version = 0  # the weight version it serves, as this engine last saw it
        self.model_path = ""
        self.tp_size: int | None = None  # as the server reports it (/server_info), None if unknown
        self.dp_size: int | None = None
        self.last_disk_update: tuple[str, int] | None = None  # its current weights, if they came from disk
        self._lock: asyncio.Lock | None = None
        self._watch: asyncio.Task | None = None

    def describe(self) -> str:
        return f"replica {self.name} at {self.url}"

    @property
    def live(self) -> bool:
        return self.healthy and self.failed is None

    # ----- start -----

    async def start(self) -> None:
        """Launch (or attach), wait for /health, read what the server serves."""
        if self.process is not None:
            self.process.start()
        try:
            await wait_healthy(self.client.health, url=self.url, timeout_s=self.cfg.startup_timeout_s,
                               process=self.process)
        except (RuntimeError, TimeoutError) as err:
            raise type(err)(f"{self.describe()}: {err}") from None
        await self._read_info()
        self.num_starts += 1
        self.healthy = True

    async def _read_info(self) -> None:
        info = await self.client.model_info()
        self.version = parse_weight_version(info.get("weight_version"), where=self.describe())
        self.model_path = str(info.get("model_path") or "")
        try:
            server = await self.client.server_info()
        except EngineRequestError:  # an SGLang-compatible server without /server_info
            return
        self.tp_size = _int_or_none(server.get("tp_size"))
        self.dp_size = _int_or_none(server.get("dp_size"))

    # ----- failures -----

    def _restart_lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def recover_if_dead(self) -> None:
        """Before a retry of a control call: restart a launched server that died."""
        if self.process is not None and not self.process.alive():
            await self.restart("exited", generation=self.num_starts)

    async def on_failure(self, kind: str, rid: str, generation: int) -> None:
        """What a failed generation attempt means for this replica (the caller resubmits).

        kind: AttemptFailed.kind. generation: `num_starts` when the attempt was sent (a
        restart since then already dealt with it)."""
        if generation != self.num_starts or kind not in ("timeout", "connection"):
            return  # 5xx / broken bodies: the server answers; the request is simply resubmitted
        if self.process is not None and await self._exited():
            await self.restart("exited", generation=generation)
            return
        if await self.client.health(timeout_s=5.0):
            if kind == "timeout":
                logger.warning("%s: request %s outlived hang_timeout_s=%g s while /health answers: a hang; "
                               "aborting it", self.describe(), rid, self.cfg.hang_timeout_s)
                await self._abort_quietly(rid)
                if self.process is not None:
                    await self.restart("hung", generation=generation)
            return  # a connection error from a server that answers: transient
        if self.process is not None:
            await self.restart("stopped answering /health", generation=generation)
        else:
            self._mark_down()

    async def _exited(self) -> bool:
        """Whether the launched process is gone (a killed server drops its connections a moment
        before it can be reaped: wait for that up to 2 s unless /health answers)."""
        for _ in range(20):
            if not self.process.alive():
                return True
            if await self.client.health(timeout_s=1.0):
                return False
            await asyncio.sleep(0.1)
        return not self.process.alive()

    async def _abort_quietly(self, rid: str) -> None:
        try:
            await self.client.abort_request(rid)
        except Exception as err:  # noqa: BLE001 - best effort: the restart or the server's own cleanup follows
            logger.warning("%s: /abort_request %s failed: %s", self.describe(), rid, err)

    def _mark_down(self) -> None:
        if not self.healthy:
            return
        logger.warning("%s does not answer /health; no requests go there until it does", self.describe())
        self.healthy = False
        self._watch = asyncio.ensure_future(self._wait_back())

    async def _wait_back(self) -> None:
        while not await self.client.health(timeout_s=5.0):
            await asyncio.sleep(1.0)
        try:
            await self._read_info()
        except EngineRequestError as err:
            logger.warning("%s answers /health again but not /model_info: %s", self.describe(), err)
            self._watch = asyncio.ensure_future(self._wait_back())
            return
        self.num_starts += 1  # possibly a new process: it left any weight-update group
        self.healthy = True
        logger.warning("%s is back", self.describe())

    async def restart(self, why: str, *, generation: int) -> None:
        """Stop and relaunch this launched server (once for every request that saw it fail)."""
        async with self._restart_lock():
            if generation != self.num_starts:
                return  # another request restarted it meanwhile
            assert self.process is not None
            self.healthy = False
            if self.restarts >= self.cfg.max_restarts:
                raise EngineRequestError(
                    f"{self.describe()} {why} (exit code {self.process.exit_code()}) and was already "
                    f"restarted {self.restarts} time(s) (engine max_restarts): {self.process.describe()}\n"
                    f"--- last log lines ---\n{self.process.log_tail()}")
            self.restarts += 1
            logger.warning("%s %s; restarting (%d/%d)", self.describe(), why, self.restarts, self.cfg.max_restarts)
            self.process.stop()  # reap the group: children of a dead leader may still hold the GPU
            started = time.monotonic()
            await self.start()
            if self.last_disk_update is not None:
                path, version = self.last_disk_update
                await self.client.update_weights_from_disk(path, weight_version=str(version))
                self.version = version
            logger.warning("%s is back after %.1f s (weight version %d)", self.describe(),
                           time.monotonic() - started, self.version)

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        await self.client.close()


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
