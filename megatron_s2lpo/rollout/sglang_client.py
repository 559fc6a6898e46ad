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

Teacher scoring (`score_payload`, `parse_score_output`) is the same route with
sampling_params.max_new_tokens = 0 and input log-probs. What SGLang 0.5.23 does with it:

- max_new_tokens 0 is valid (`sampling/sampling_params.py`: must be >= 0) and makes the
  request prefill-only (`Req.is_prefill_only` in `managers/schedule_batch.py`); the worker
  skips sampling (`managers/tp_worker.py`), and the answer has output_ids [] and
  finish_reason {type: length, length: 0} (`Req.update_finish_state`, output ids cut to
  finished_len 0). output_token_logprobs is [] for a batch of prefill-only requests, but may
  hold one entry when the request shares a batch with sampling requests
  (`scheduler_components/output_streamer.py` slices to max(len(output_ids), 1)): ignored here.
- logprob_start_len s (`managers/scheduler.py`): -1 (the default) means no input log-probs;
  0 <= s <= len(input_ids) is used as given; s > len(input_ids) aborts the request (HTTP 400,
  "is higher than the number of input tokens"). The radix cache reuses at most s prefix
  tokens (`Req._compute_max_prefix_len`), so the positions asked for are always computed.
- input log-probs are computed at positions s .. L-1, position p scoring token p + 1
  (`ScheduleBatch.prepare_for_extend`: extend_input_logprob_token_ids =
  origin_input_ids[s + 1:], the last one padded), then
  `scheduler_components/logprob_result_processor.py::_process_input_token_logprobs` sets
  values = [None] + computed[:-1] and ids = origin_input_ids[s:]. So entry j of
  meta_info.input_token_logprobs is [log p(token s + j | tokens < s + j), token s + j, null]
  for j >= 1, and entry 0 is [null, token s, null] for EVERY s, not only s = 0. Ids >=
  vocab_size - 1 are reported as 0 there (a clip meant for multimodal placeholder ids).
- input_top_logprobs (with top_logprobs_num k): [None] + the top-k rows of positions s ..
  L-2 (`_process_input_top_logprobs`), so entry j >= 1 is the k most likely tokens of the
  distribution that predicts token s + j, as [[logprob, token_id, text-or-null] x k]
  (`tokenizer_manager.detokenize_top_logprobs_tokens`; empty rows become null), sorted
  descending (`layers/logprob_processor.py`: logprobs.topk(k)).
- no temperature is applied to input log-probs: `logprob_processor.py` takes
  log_softmax(logits) (or logits - logsumexp on the fast path) of the raw logits;
  `sampling_params.temperature` only affects sampled tokens.
- text entries are null unless return_text_in_logprobs is set.

We therefore send logprob_start_len = len(prompt) - 1: entry 0 is the last prompt token
(null log-prob), entries 1 .. R are the R response tokens, and the prompt's own log-probs
are neither computed nor sent (slime's teacher scoring sends 0 and keeps the tail; same
numbers, L - R - 1 more entries). Same-prompt rollouts can share the cached prompt prefix.

Request ids: SGLang refuses a `rid` that is still alive on the server (400 "Duplicate request
ID detected", `TokenizerManager._init_req_state`), and a request whose client gave up keeps
running until the server notices the disconnect. So every submission of a request gets its own
wire rid (`wire_rid`: the request id, then `<id>~r<k>` for the k-th resubmission), the answer
must carry that rid, and the completion keeps the caller's request id.

Errors: connection errors, timeouts, 5xx answers and truncated or non-JSON bodies are retried
(`call`: with exponential backoff, after asking `recover` to restart a dead server; generation
attempts are retried by the engine, which may resubmit them to another replica); 4xx answers
are not. The final error names the server URL, the request id and the server's last answer.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
import torch

from ..types import FinishReason
from .engine import Completion, GenerateRequest, parse_weight_version
from .scoring import ScoreRequest, TokenScores

T = TypeVar("T")
_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.ABORT}


class EngineRequestError(RuntimeError):
    """A request to an SGLang server failed for good (4xx, bad answer, or retries spent)."""


class RequestAborted(EngineRequestError):
    """The server aborted a scoring request (a generation comes back as FinishReason.ABORT)."""


class AttemptFailed(Exception):
    """One attempt failed in a way worth retrying. kind: connection | timeout | server_error |
    bad_body; `answer` describes what came back."""

    def __init__(self, kind: str, answer: str) -> None:
        super().__init__(answer)
        self.kind = kind
        self.answer = answer


def wire_rid(request_id: str, submission: int) -> str:
    """The rid of the `submission`-th submission (0: the first) of a request."""
    return request_id if submission == 0 else f"{request_id}~r{submission}"


def generate_payload(req: GenerateRequest, rid: str | None = None) -> dict:
    """The /generate body for one request (SGLang GenerateReqInput field names)."""
    return {
        "rid": rid or req.request_id,
        "input_ids": list(req.prompt_ids),
        "sampling_params": req.sampling_params(),
        "return_logprob": req.return_logprob,
        "stream": False,
        **({"return_routed_experts": True} if req.return_routed_experts else {}),
    }


def parse_routed_experts(value: Any, rows: int, *, where: str) -> torch.Tensor:
    """meta_info.routed_experts -> (rows, layers * top_k) int16.

    SGLang 0.5.23 sends the base64 of the int32 (token, layer, top_k) array of the tokens
    [0, prompt + output - 1) (`state_capturer/routed_experts.py`, `extract_routed_experts_from_meta_info`;
    the detokenizer encodes it, `routed_experts_start_len` 0)."""
    if not isinstance(value, str):
        raise EngineRequestError(f"{where}: meta_info.routed_experts is {_excerpt(value)}, expected base64; "
                                 "launch the server with --enable-return-routed-experts")
    try:
        flat = torch.frombuffer(bytearray(base64.b64decode(value, validate=True)), dtype=torch.int32)
    except (ValueError, binascii.Error) as err:
        raise EngineRequestError(f"{where}: meta_info.routed_experts is not base64 int32 ({err})") from None
    if rows < 1 or flat.numel() % rows:
        raise EngineRequestError(f"{where}: {flat.numel()} routed expert ids do not split into {rows} token rows "
                                 "(prompt + output - 1)")
    return flat.view(rows, -1).to(torch.int16)


def parse_generate_output(out: Any, req: GenerateRequest, *, url: str, rid: str | None = None) -> Completion:
    """SGLang's /generate answer for one request -> Completion (checks it is well formed).

    An aborted request (finish_reason abort) may carry a partial answer: it is returned with
    the tokens whose log-probs came back, marked FinishReason.ABORT."""
    rid = rid or req.request_id
    where = f"{url}/generate request {rid!r}"
    if not isinstance(out, dict) or not isinstance(out.get("meta_info"), dict) or "output_ids" not in out:
        raise EngineRequestError(f"{where}: unexpected answer {_excerpt(out)}")
    meta = out["meta_info"]
    if meta.get("id", rid) != rid:
        raise EngineRequestError(f"{where}: the answer is for request {meta['id']!r}")
    token_ids = [int(t) for t in out["output_ids"]]
    reason = meta.get("finish_reason") or {}
    kind = reason.get("type") if isinstance(reason, dict) else reason
    if kind not in _FINISH:
        raise EngineRequestError(f"{where}: unknown finish_reason {reason!r}")
    if kind == "abort":
        triples = meta.get("output_token_logprobs") or []
        token_ids = token_ids[:len(triples)] if req.return_logprob else token_ids
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
    routed = None
    if req.return_routed_experts and kind != "abort":  # an aborted request is retried, not trained on
        routed = parse_routed_experts(meta.get("routed_experts"), len(req.prompt_ids) + len(token_ids) - 1,
                                      where=where)
    return Completion(
        request_id=req.request_id,
        prompt_ids=list(req.prompt_ids),
        token_ids=token_ids,
        text=out.get("text") or "",
        logprobs=logprobs,
        finish_reason=_FINISH[kind],
        weight_version=parse_weight_version(meta.get("weight_version"), where=url),
        routed_experts=routed,
    )


def score_payload(req: ScoreRequest, rid: str | None = None) -> dict:
    """The /generate body that scores one request's response tokens (prefill only)."""
    payload = {
        "rid": rid or req.request_id,
        "input_ids": list(req.prompt_ids) + list(req.response_ids),
        "sampling_params": {"max_new_tokens": 0, "temperature": 1.0},
        "return_logprob": True,
        "logprob_start_len": len(req.prompt_ids) - 1,
        "stream": False,
    }
    if req.top_k:
        payload["top_logprobs_num"] = req.top_k
    return payload


def parse_score_output(out: Any, req: ScoreRequest, *, url: str, rid: str | None = None) -> TokenScores:
    """SGLang's answer to `score_payload(req)` -> TokenScores (checked entry by entry).

    Expects meta_info.input_token_logprobs for the tokens from the last prompt token on (see
    the module docstring): R + 1 entries, entry 0 (null log-prob) dropped. A token id of 0 is
    accepted for any token (SGLang reports ids >= vocab_size - 1 as 0).
    """
    rid = rid or req.request_id
    where = f"{url}/generate score request {rid!r}"
    if not isinstance(out, dict) or not isinstance(out.get("meta_info"), dict):
        raise EngineRequestError(f"{where}: unexpected answer {_excerpt(out)}")
    meta = out["meta_info"]
    if meta.get("id", rid) != rid:
        raise EngineRequestError(f"{where}: the answer is for request {meta['id']!r}")
    reason = meta.get("finish_reason") or {}
    if isinstance(reason, dict) and reason.get("type") == "abort":
        raise RequestAborted(f"{where}: aborted by the server: {reason.get('message')!r}")
    tokens = [req.prompt_ids[-1]] + list(req.response_ids)  # what entries 0 .. R refer to
    entries = meta.get("input_token_logprobs")
    if not isinstance(entries, list) or len(entries) != len(tokens):
        raise EngineRequestError(
            f"{where}: expected {len(tokens)} input_token_logprobs (last prompt token + "
            f"{len(req.response_ids)} response tokens), got {_excerpt(entries)}; the server must "
            "honour return_logprob and logprob_start_len")
    logprobs = []
    for j, entry in enumerate(entries):
        if not isinstance(entry, (list, tuple)) or len(entry) < 2:
            raise EngineRequestError(f"{where}: input_token_logprobs[{j}] is {_excerpt(repr(entry))}, "
                                     "expected [logprob, token_id, text]")
        _check_token(where, f"input_token_logprobs[{j}]", entry[1], tokens[j])
        if j == 0:
            continue
        if not isinstance(entry[0], (int, float)):
            raise EngineRequestError(f"{where}: input_token_logprobs[{j}] (response token "
                                     f"{j - 1}) has no log-prob: {_excerpt(entry)}")
        logprobs.append(float(entry[0]))
    top_ids = top_logprobs = None
    if req.top_k:
        top_ids, top_logprobs = _parse_top(where, meta.get("input_top_logprobs"), req)
    return TokenScores(request_id=req.request_id, logprobs=logprobs, top_ids=top_ids,
                       top_logprobs=top_logprobs)


def _parse_top(where: str, rows: Any, req: ScoreRequest) -> tuple[list[list[int]], list[list[float]]]:
    """input_top_logprobs entries 1 .. R -> (top ids, top log-probs) per response token."""
    num = len(req.response_ids) + 1
    if not isinstance(rows, list) or len(rows) != num:
        raise EngineRequestError(f"{where}: expected {num} input_top_logprobs rows, got "
                                 f"{_excerpt(rows)}; the server must honour top_logprobs_num")
    top_ids, top_logprobs = [], []
    for j, row in enumerate(rows[1:], start=1):
        if not isinstance(row, list) or len(row) != req.top_k or not all(
                isinstance(e, (list, tuple)) and len(e) >= 2 and isinstance(e[0], (int, float))
                for e in row):
            raise EngineRequestError(f"{where}: input_top_logprobs[{j}] should hold {req.top_k} "
                                     f"[logprob, token_id, text] entries, got {_excerpt(row)}")
        top_ids.append([int(e[1]) for e in row])
        top_logprobs.append([float(e[0]) for e in row])
    return top_ids, top_logprobs


def _check_token(where: str, what: str, got: Any, expected: int) -> None:
    if not isinstance(got, int) or (got != expected and got != 0):
        raise EngineRequestError(f"{where}: {what} is for token {got!r}, the request has {expected} "
                                 "there")


class SGLangClient:
    """Talks to one SGLang server. Create and use it inside one event loop.

    request_timeout_s bounds every control call; generation and scoring attempts
    (`generate_once`, `score_once`) are bounded by hang_timeout_s instead.
    """

    def __init__(
        self,
        url: str,
        *,
        api_key: str = "",
        max_concurrency: int = 256,
        request_timeout_s: float = 600.0,
        hang_timeout_s: float | None = None,
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
        self.request_timeout_s = request_timeout_s
        self.hang_timeout_s = hang_timeout_s or request_timeout_s
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._semaphore = asyncio.Semaphore(max_concurrency)
        self._session: aiohttp.ClientSession | None = None
        self._max_concurrency = max_concurrency

    async def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._max_concurrency + 16)  # + control calls
            self._session = aiohttp.ClientSession(connector=connector, headers=self._headers)
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()

    # ----- generation -----

    async def generate(self, requests: list[GenerateRequest]) -> list[Completion]:
        """One completion per request, in order, each sent on its own and retried on this server
        (a fresh rid per attempt). `SGLangEngine` spreads requests over replicas instead."""
        return await gather_all([self._retried(self.generate_once, r) for r in requests])

    async def score(self, requests: list[ScoreRequest]) -> list[TokenScores]:
        """Teacher scores per request, in order (like `generate`)."""
        return await gather_all([self._retried(self.score_once, r) for r in requests])

    async def _retried(self, once: Callable[..., Awaitable[T]], req: Any) -> T:
        attempt = 0
        while True:
            rid = wire_rid(req.request_id, attempt)
            try:
                return await once(req, rid)
            except AttemptFailed as err:
                attempt += 1
                if attempt > self.max_retries:
                    raise EngineRequestError(f"POST {self.url}/generate (request {req.request_id}, rid {rid}) failed "
                                             f"after {attempt} attempt(s); last answer: {err.answer}") from None
                if self.recover is not None:
                    await self.recover()
                await asyncio.sleep(self.backoff(attempt))

    # one attempt each (the engine retries them, on any replica)

    async def generate_once(self, req: GenerateRequest, rid: str | None = None) -> Completion:
        rid = rid or req.request_id
        out = await self._attempt("POST", "/generate", generate_payload(req, rid), rid,
                                  timeout_s=self.hang_timeout_s, expect_json=True)
        return parse_generate_output(out, req, url=self.url, rid=rid)

    async def score_once(self, req: ScoreRequest, rid: str | None = None) -> TokenScores:
        rid = rid or req.request_id
        out = await self._attempt("POST", "/generate", score_payload(req, rid), rid,
                                  timeout_s=self.hang_timeout_s, expect_json=True)
        return parse_score_output(out, req, url=self.url, rid=rid)

    # ----- transport -----

    async def call(self, method: str, path: str, payload: dict | None = None, *,
                   request_id: str = "", retry: bool = True, timeout_s: float | None = None,
                   expect_json: bool = False) -> Any:
        """Send with retries; returns the decoded JSON (or text) answer of a 2xx response."""
        attempt = 0
        while True:
            try:
                return await self._attempt(method, path, payload, request_id,
                                           timeout_s=timeout_s or self.request_timeout_s, expect_json=expect_json)
            except AttemptFailed as err:
                attempt += 1
                if not retry or attempt > self.max_retries:
                    raise EngineRequestError(
                        f"{method} {self.url}{path} (request {request_id or '-'}) failed after "
                        f"{attempt} attempt(s); last answer: {err.answer}") from None
                if self.recover is not None:
                    await self.recover()
                await asyncio.sleep(self.backoff(attempt))

    def backoff(self, attempt: int) -> float:
        """Jittered exponential backoff before retry `attempt` (1-based)."""
        delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        return delay * (0.5 + random.random() / 2)

    async def _attempt(self, method: str, path: str, payload: dict | None, request_id: str, *,
                       timeout_s: float, expect_json: bool = False) -> Any:
        session = await self._get_session()
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        try:
            async with self._semaphore:
                # SGLang 0.5.23 answers 400 to a POST body without Content-Type: application/json
                # (seen on the real server), so every POST carries a JSON body, `{}` at least.
                sent = payload if payload is not None or method == "GET" else {}
                async with session.request(method, self.url + path, json=sent, timeout=timeout) as resp:
                    body = await resp.read()
                    status, ctype = resp.status, resp.content_type
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as err:
            raise AttemptFailed("connection", f"connection error {type(err).__name__}: {err}") from None
        except asyncio.TimeoutError:
            raise AttemptFailed("timeout", f"no answer within {timeout_s:g} s") from None
        text = body.decode("utf-8", errors="replace")
        if status >= 500:
            raise AttemptFailed("server_error", f"HTTP {status}: {_excerpt(text)}")
        if status >= 400:
            raise EngineRequestError(
                f"{method} {self.url}{path} (request {request_id or '-'}) was rejected with "
                f"HTTP {status}: {_excerpt(text)}")
        if ctype != "application/json" and not expect_json:
            return text
        try:
            return json.loads(text) if text or not expect_json else json.loads("?")
        except ValueError:  # a truncated body, an HTML error page from a proxy, ...
            raise AttemptFailed("bad_body", f"HTTP {status} with a truncated or non-JSON body "
                                            f"({len(body)} bytes, {ctype}): {_excerpt(text) or '(empty)'}") from None

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

    async def model_info(self) -> dict:
        """GET /model_info (`/get_model_info` is its deprecated alias in 0.5.23)."""
        return await self.call("GET", "/model_info", expect_json=True)

    async def server_info(self) -> dict:
        """GET /server_info: the launch configuration (tp_size, dp_size, ...)."""
        return await self.call("GET", "/server_info", expect_json=True)

    async def flush_cache(self) -> str:
        return await self.call("POST", "/flush_cache")

    async def abort_request(self, rid: str = "", *, abort_all: bool = False, timeout_s: float = 10.0) -> None:
        """POST /abort_request {rid, abort_all} (AbortReq); the answer is an empty 200."""
        await self.call("POST", "/abort_request", {"rid": rid, "abort_all": abort_all}, request_id=rid,
                        retry=False, timeout_s=timeout_s)

    async def update_weights_from_disk(self, model_path: str, *, weight_version: str | None = None,
                                       flush_cache: bool = True, abort_all_requests: bool = False,
                                       load_format: str | None = None) -> dict:
        body = {"model_path": model_path, "flush_cache": flush_cache,
                "abort_all_requests": abort_all_requests, "weight_version": weight_version,
                "load_format": load_format}
        return await self.call("POST", "/update_weights_from_disk", body, retry=False)

    async def begin_weight_update(self) -> dict:
        """Open a weight-update session (tensor and distributed updates need one)."""
        return await self.call("POST", "/begin_weight_update", {}, retry=False)

    async def end_weight_update(self, *, timeout_s: float | None = None) -> dict:
        return await self.call("POST", "/end_weight_update", {}, retry=False, timeout_s=timeout_s)

    async def init_weights_update_group(self, *, master_address: str, master_port: int,
                                        rank_offset: int, world_size: int,
                                        group_name: str = "weight_update_group",
                                        backend: str = "nccl") -> dict:
        body = {"master_address": master_address, "master_port": master_port,
                "rank_offset": rank_offset, "world_size": world_size,
                "group_name": group_name, "backend": backend}
        return await self.call("POST", "/init_weights_update_group", body, retry=False)

    async def destroy_weights_update_group(self, group_name: str, *, timeout_s: float | None = None) -> dict:
        return await self.call("POST", "/destroy_weights_update_group", {"group_name": group_name},
                               retry=False, timeout_s=timeout_s)

    async def update_weights_from_distributed(self, *, names: list[str], dtypes: list[str],
                                              shapes: list[list[int]],
                                              group_name: str = "weight_update_group",
                                              flush_cache: bool = True,
                                              weight_version: str | None = None,
                                              load_format: str | None = None) -> dict:
        body = {"names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name,
                "flush_cache": flush_cache, "weight_version": weight_version, "load_format": load_format}
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


async def gather_all(coros: list[Awaitable[T]]) -> list[T]:
    """Run concurrently, results in order; when one fails for good, cancel the rest."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _excerpt(value: Any, limit: int = 300) -> str:
    text = value if isinstance(value, str) else repr(value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."
