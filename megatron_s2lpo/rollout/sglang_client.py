"""Async HTTP client for SGLang's native server API.

Field names, routes and response shapes follow SGLang 0.5.23:
`sglang/srt/managers/io_struct.py` (GenerateReqInput, UpdateWeightFromDiskReqInput,
InitWeightsUpdateGroupReqInput, UpdateWeightsFromDistributedReqInput,
UpdateWeightsFromTensorReqInput, Release/ResumeMemoryOccupationReqInput,
Pause/ContinueGenerationReqInput, UpdateWeightVersionReqInput) and
`sglang/srt/entrypoints/http_server.py` (routes and answers). In particular:

- POST /generate {input_ids, sampling_params, return_logprob, rid, stream: false} answers
  {text, output_ids, meta_info: {id, finish_reason: {type: stop|length|abort, ...},
  prompt_tokens, completion_tokens, weight_version, output_token_logprobs:
  [[logprob, token_id, text-or-null], ...], ...}}; output_ids include the eos token.
- weight updates answer {success, message} with 200, or 400 when success is false; the
  `weight_version` field of an update request sets the version the server reports in
  meta_info and /get_model_info (a string; "default" until set).
- auth is `Authorization: Bearer <api_key>`; /health* is always open.

Errors: connection errors, timeouts and 5xx answers are retried with exponential backoff
(after asking `recover` to restart a dead server); 4xx answers are not. The final error
names the server URL, the request id and the server's last answer.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from ..types import FinishReason
from .engine import Completion, GenerateRequest, parse_weight_version

_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.ABORT}


class EngineRequestError(RuntimeError):
    """A request to an SGLang server failed for good (4xx, bad answer, or retries spent)."""


class _Retryable(Exception):
    """Internal: this attempt failed in a way worth retrying; `answer` describes it."""

    def __init__(self, answer: str) -> None:
        super().__init__(answer)
        self.answer = answer


def generate_payload(req: GenerateRequest) -> dict:
    """The /generate body for one request (SGLang GenerateReqInput field names)."""
    return {
        "rid": req.request_id,
        "input_ids": list(req.prompt_ids),
        "sampling_params": req.sampling_params(),
        "return_logprob": req.return_logprob,
        "stream": False,
    }


def parse_generate_output(out: Any, req: GenerateRequest, *, url: str) -> Completion:
    """SGLang's /generate answer for one request -> Completion (checks it is well formed)."""
    where = f"{url}/generate request {req.request_id!r}"
    if not isinstance(out, dict) or "meta_info" not in out or "output_ids" not in out:
        raise EngineRequestError(f"{where}: unexpected answer {_excerpt(out)}")
    meta = out["meta_info"]
    if meta.get("id", req.request_id) != req.request_id:
        raise EngineRequestError(f"{where}: the answer is for request {meta['id']!r}")
    token_ids = [int(t) for t in out["output_ids"]]
    reason = meta.get("finish_reason") or {}
    kind = reason.get("type") if isinstance(reason, dict) else reason
    if kind not in _FINISH:
        raise EngineRequestError(f"{where}: unknown finish_reason {reason!r}")
    if req.return_logprob:
        triples = meta.get("output_token_logprobs")
        if triples is None or len(triples) != len(token_ids):
            raise EngineRequestError(
                f"{where}: {len(token_ids)} output_ids but output_token_logprobs is "
                f"{_excerpt(triples)}; the server must honour return_logprob")
        for i, (_logprob, token, *_rest) in enumerate(triples):
            if int(token) != token_ids[i]:
                raise EngineRequestError(f"{where}: log-prob {i} is for token {token}, "
                                         f"output_ids[{i}] is {token_ids[i]}")
        logprobs = [float(t[0]) for t in triples]
    else:
        logprobs = [0.0] * len(token_ids)
    return Completion(
        request_id=req.request_id,
        prompt_ids=list(req.prompt_ids),
        token_ids=token_ids,
        text=out.get("text") or "",
        logprobs=logprobs,
        finish_reason=_FINISH[kind],
        weight_version=parse_weight_version(meta.get("weight_version"), where=url),
    )


class SGLangClient:
    """Talks to one SGLang server. Create and use it inside one event loop."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str = "",
        max_concurrency: int = 256,
        request_timeout_s: float = 600.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        recover: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.recover = recover  # called before a retry: restarts the server if it died
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        self._semaphore = asyncio.Semaphore(max_concurrency)
        self._session: aiohttp.ClientSession | None = None
        self._max_concurrency = max_concurrency

    async def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._max_concurrency)
            self._session = aiohttp.ClientSession(connector=connector, headers=self._headers)
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()

    # ----- generation -----

    async def generate(self, requests: list[GenerateRequest]) -> list[Completion]:
        """One completion per request, in order; each request is sent on its own."""
        tasks = [asyncio.ensure_future(self.generate_one(r)) for r in requests]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:  # one request failed for good: do not leave the rest running
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def generate_one(self, req: GenerateRequest) -> Completion:
        out = await self.call("POST", "/generate", generate_payload(req), request_id=req.request_id)
        return parse_generate_output(out, req, url=self.url)

    # ----- transport -----

    async def call(self, method: str, path: str, payload: dict | None = None, *,
                   request_id: str = "", retry: bool = True) -> Any:
        """Send with retries; returns the decoded JSON (or text) answer of a 2xx response."""
        attempt = 0
        while True:
            try:
                return await self._attempt(method, path, payload, request_id)
            except _Retryable as err:
                attempt += 1
                if not retry or attempt > self.max_retries:
                    raise EngineRequestError(
                        f"{method} {self.url}{path} (request {request_id or '-'}) failed after "
                        f"{attempt} attempt(s); last answer: {err.answer}") from None
                if self.recover is not None:
                    await self.recover()
                delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
                await asyncio.sleep(delay * (0.5 + random.random() / 2))

    async def _attempt(self, method: str, path: str, payload: dict | None, request_id: str) -> Any:
        session = await self._get_session()
        try:
            async with self._semaphore:
                async with session.request(method, self.url + path, json=payload,
                                           timeout=self._timeout) as resp:
                    body = await resp.read()
                    status, ctype = resp.status, resp.content_type
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as err:
            raise _Retryable(f"connection error {type(err).__name__}: {err}") from None
        except asyncio.TimeoutError:
            raise _Retryable(f"no answer within {self._timeout.total} s") from None
        text = body.decode("utf-8", errors="replace")
        if status >= 500:
            raise _Retryable(f"HTTP {status}: {_excerpt(text)}")
        if status >= 400:
            raise EngineRequestError(
                f"{method} {self.url}{path} (request {request_id or '-'}) was rejected with "
                f"HTTP {status}: {_excerpt(text)}")
        if ctype == "application/json":
            return json.loads(text) if text else None
        return text

    # ----- endpoint wrappers (SGLang 0.5.23 routes) -----

    async def health(self, timeout_s: float = 5.0) -> bool:
        """GET /health answers 200 (no retries; False on any failure)."""
        return await self._probe("/health", timeout_s)

    async def health_generate(self, timeout_s: float = 30.0) -> bool:
        """GET /health_generate: the server also generates one token."""
        return await self._probe("/health_generate", timeout_s)

    async def _probe(self, path: str, timeout_s: float) -> bool:
        session = await self._get_session()
        try:
            async with session.get(self.url + path, timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
                await r.read()
                return r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    async def get_model_info(self) -> dict:
        return await self.call("GET", "/get_model_info")

    async def flush_cache(self) -> str:
        return await self.call("POST", "/flush_cache")

    async def update_weights_from_disk(self, model_path: str, *, weight_version: str | None = None,
                                       flush_cache: bool = True, abort_all_requests: bool = False,
                                       load_format: str | None = None) -> dict:
        body = {"model_path": model_path, "flush_cache": flush_cache,
                "abort_all_requests": abort_all_requests, "weight_version": weight_version,
                "load_format": load_format}
        return await self.call("POST", "/update_weights_from_disk", body, retry=False)

    async def init_weights_update_group(self, *, master_address: str, master_port: int,
                                        rank_offset: int, world_size: int,
                                        group_name: str = "weight_update_group",
                                        backend: str = "nccl") -> dict:
        body = {"master_address": master_address, "master_port": master_port,
                "rank_offset": rank_offset, "world_size": world_size,
                "group_name": group_name, "backend": backend}
        return await self.call("POST", "/init_weights_update_group", body, retry=False)

    async def update_weights_from_distributed(self, *, names: list[str], dtypes: list[str],
                                              shapes: list[list[int]],
                                              group_name: str = "weight_update_group",
                                              flush_cache: bool = True,
                                              weight_version: str | None = None) -> dict:
        body = {"names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name,
                "flush_cache": flush_cache, "weight_version": weight_version}
        return await self.call("POST", "/update_weights_from_distributed", body, retry=False)

    async def update_weights_from_tensor(self, serialized_named_tensors: list[str], *,
                                         load_format: str | None = None, flush_cache: bool = True,
                                         weight_version: str | None = None) -> dict:
        """`serialized_named_tensors`: one base64 payload per TP rank (CUDA IPC handles)."""
        body = {"serialized_named_tensors": serialized_named_tensors, "load_format": load_format,
                "flush_cache": flush_cache, "weight_version": weight_version}
        return await self.call("POST", "/update_weights_from_tensor", body, retry=False)

    async def update_weight_version(self, new_version: str, *, abort_all_requests: bool = False) -> dict:
        body = {"new_version": new_version, "abort_all_requests": abort_all_requests}
        return await self.call("POST", "/update_weight_version", body, retry=False)

    async def pause_generation(self, mode: str = "abort") -> dict:
        """mode: abort | retract | in_place (PauseGenerationReqInput.mode)."""
        return await self.call("POST", "/pause_generation", {"mode": mode})

    async def continue_generation(self) -> dict:
        return await self.call("POST", "/continue_generation", {})

    async def release_memory_occupation(self, tags: list[str] | None = None) -> Any:
        """tags: None (all) or a subset of ["weights", "kv_cache"]."""
        return await self.call("POST", "/release_memory_occupation", {"tags": tags})

    async def resume_memory_occupation(self, tags: list[str] | None = None) -> Any:
        return await self.call("POST", "/resume_memory_occupation", {"tags": tags})


def _excerpt(value: Any, limit: int = 300) -> str:
    text = value if isinstance(value, str) else repr(value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."
