"""SGLang-protocol test server: SGLang 0.5.23's native HTTP API over a tiny in-process model.

Run from the repository root:

    python tests/protocol_server.py --model-path /path/to/hf_dir --port 31000
    python tests/protocol_server.py --tiny --port 31000     # random tiny Qwen3 + synthetic tokenizer
    python tests/protocol_server.py --noop --port 31000     # fixed tokens, no model (client benchmark;
                                                            # --model-path is then only reported)

It takes sglang.launch_server's flags (`--tp-size`, `--dp-size`, `--base-gpu-id`,
`--mem-fraction-static`, `--enable-memory-saver`, `--api-key`, `--weight-version`,
`--random-seed`, `--enable-deterministic-inference`; the parallel/memory ones are accepted and
ignored), so `SGLangEngine` launches it exactly like the real server. Run N of them on N ports
for N replicas.

Contract mode (`--sglang-source DIR`, tests/contract/): the server also loads SGLang 0.5.23's own
code from the unpacked wheel, parses its command line with SGLang's `ServerArgs`, checks every
request body with SGLang's request types and validators, runs the weight-update routes through
SGLang's `SchedulerWeightUpdaterManager` and model-runner `WeightUpdater` (the model's
`load_weights` writes into the tiny model), and builds /generate answers with SGLang's
`api_types.GenerateResponse` (tests/contract/sglang_backend.py).

Version followed: SGLang 0.5.23, read in its wheel and checked against the real 0.5.23 server
running on this CPU (tests/real_sglang/test_real_server.py, December 2026): a POST body without
`Content-Type: application/json` is refused with 400; an unknown top-level JSON field is ignored
(contract mode records it as a violation of our client, then ignores it too); an unknown field
inside sampling_params is refused with 400 naming it; a POST without a body is accepted.

Reproduced from SGLang (sglang/srt/entrypoints/http_server.py, managers/io_struct.py):
  - POST /generate with input_ids (one prompt or a batch), text (with a tokenizer),
    sampling_params (temperature, top_p, top_k, max_new_tokens, stop, stop_token_ids,
    sampling_seed; temperature 0 is greedy as top_k=1), return_logprob, rid; answers
    {text, output_ids, meta_info{id, finish_reason, prompt_tokens, completion_tokens,
    cached_tokens, weight_version, output_token_logprobs=[[logprob, token_id, null]]}},
    a list for a batch; errors as {"error": {"message"}} with 400; stream=true is refused;
  - prefill-only scoring: sampling_params.max_new_tokens=0 with return_logprob,
    logprob_start_len s and top_logprobs_num k answers output_ids [], finish_reason
    {type: length, length: 0}, output_token_logprobs [], input_token_logprobs for tokens
    s .. L-1 with entry 0 [null, token s, null] and entries j >= 1 [log p(token s+j | prefix),
    token s+j, null] (ids >= vocab_size - 1 reported as 0, as SGLang clips them), and with k > 0
    input_top_logprobs [null, [[logprob, id, null] x k], ...] (the distribution predicting each
    token), computed by LocalEngine.score at temperature 1; s = -1 (default) gives no input
    log-probs and s > L answers 400 (see megatron_s2lpo/rollout/sglang_client.py);
  - GET /health, /health_generate; GET /get_model_info, /model_info; GET /get_server_info,
    /server_info; GET|POST /flush_cache (text answer);
  - POST /update_weights_from_disk {model_path, weight_version, ...} -> {success, message,
    num_paused_requests}, 400 when success is false; POST /update_weight_version;
  - POST /pause_generation, /continue_generation (new batches wait while paused);
  - GET|POST /release_memory_occupation, /resume_memory_occupation (state only; answer null);
  - rids: a rid that is still being served is refused (400 "Duplicate request ID detected");
    POST /abort_request {rid, abort_all} ends requests with finish_reason {type: abort};
  - POST /pause_generation {mode}: abort ends every running request (they answer with
    finish_reason abort), then new ones wait; retract / in_place hold them; /continue_generation;
  - sampling_seed is used only with --enable-deterministic-inference (SGLang ignores it
    otherwise); requests without it draw from the server's stream seeded by --random-seed;
  - weight updates (tests/protocol_weights.py): /begin_weight_update, /end_weight_update,
    /update_weights_from_tensor and /update_weights_from_distributed only inside a session,
    /init_weights_update_group (gloo or nccl, the server joins as rank_offset), flattened
    buckets as one broadcast, /destroy_weights_update_group; 400 {success: false, message} as
    SGLang answers (the tensor route has no CUDA IPC here and always refuses outside contract mode);
  - /get_model_info is SGLang's deprecated alias of /model_info: it answers, logs a warning and
    is counted in /_test/state;
  - Authorization: Bearer <api_key> on every route except /health*, 401 otherwise.
Not reproduced: radix cache, continuous batching (requests that arrive together are batched
into one generation call instead), streaming, multimodal inputs, top-logprobs and input
log-probs of generating requests (only prefill-only requests return them), token_ids_logprob,
OpenAI routes, weight version spans inside one request, real memory release.

Fault injection for tests: --fail-first N (the first N /generate requests answer 500),
--delay-s S (sleep before each generation), POST /_test/faults {"fail_next", "status",
"delay_s", "latency_ms_per_token", "hang_next" (that many requests never answer until aborted),
"truncate_next" (answer 200 with a cut-off JSON body), "refuse_updates" (refuse that many
distributed buckets)} and GET /_test/state (counters, rids served, batches held for their
decode time, paused / released state, session, contract violations).

Simulated decode time: --latency-ms-per-token MS (default 0: answer as soon as the tiny model is
done) holds every generation batch until MS x its longest completion (in tokens) has passed
since the batch started, as a batched decoder takes one step per token for the whole batch; so
a CPU run shows a remote GPU server's timing. A batch starts when its last request arrived, and
the next batch starts while the previous one decodes (as with continuous batching: the tiny
model's own compute, done one batch after the other, then hides inside the simulated decode
instead of adding to it). The wait runs on the event loop without blocking it (other routes
answer meanwhile, an aborted request answers at once, a batch whose requests were all aborted
stops "decoding"). The clock stops while generation is paused with mode in_place / retract, as
SGLang's scheduler runs no batch while paused (managers/scheduler.py, event_loop_normal and
pause_generation). Prefill-only requests take no decode steps. In --noop mode each /generate
call is a batch of its fixed answers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time

from aiohttp import web

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from protocol_answers import (Prefill, _abort_output, _answer, _format, _format_prefill,  # noqa: E402
                              _noop_output, _parse_batch, simulated_decode)


ABORTED = object()  # the result of a request ended by /abort_request or a pause in abort mode


class ServerState:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.engine = None  # LocalEngine, None in --noop mode
        self.model_path = args.model_path or ("tiny" if args.tiny else "")
        self.weight_version = args.weight_version
        self.running = asyncio.Event()
        self.running.set()
        self.released: set[str] = set()
        self.fail_next = args.fail_first
        self.fail_status = 500
        self.delay_s = args.delay_s
        self.latency_s_per_token = args.latency_ms_per_token / 1000.0
        self.decoding: set[asyncio.Task] = set()  # batches held for their simulated decode time
        self.num_held = 0  # batches held so far
        self.hang_next = 0
        self.truncate_next = 0
        self.num_generate = 0
        self.num_failed = 0
        self.num_aborted = 0
        self.num_deprecated = 0  # calls of deprecated aliases (/get_model_info, /get_server_info)
        self.completed: list[str] = []  # rids answered with a finished (not aborted) completion
        self.inflight: dict[str, asyncio.Future] = {}  # rid -> result future, while being served
        self.queue: asyncio.Queue = asyncio.Queue()
        self.weights = None  # ProtocolWeights, or the contract backend (SGLang's own code)
        self.contract = None  # the contract backend in --sglang-source mode
        self.violations: list[str] = []  # requests SGLang's own parsers refused (contract mode)
        self.sglang_args: dict = {}  # the command line as SGLang's ServerArgs parsed it (contract mode)

    def set_version(self, version: str | None) -> None:
        if version is not None:
            self.weight_version = version

    def abort(self, rid: str | None = None) -> int:
        """End `rid` (None: every request) with finish_reason abort; returns how many."""
        targets = list(self.inflight.values()) if rid is None else [self.inflight[rid]] if rid in self.inflight else []
        count = 0
        for fut in targets:
            if not fut.done():
                fut.set_result(ABORTED)
                count += 1
        self.num_aborted += count
        return count


def build_engine(args: argparse.Namespace):
    import torch

    from megatron_s2lpo.rollout.local import LocalEngine

    torch.set_num_threads(args.num_threads)
    seed = args.seed if args.random_seed is None else args.random_seed
    if args.model_path:
        return LocalEngine.from_pretrained(args.model_path, seed=seed, max_batch_size=args.max_batch_size)
    from megatron_s2lpo.config.model import ModelArch
    from megatron_s2lpo.data.tokenizer import build_synthetic_tokenizer

    tok = build_synthetic_tokenizer()
    arch = ModelArch(family="qwen3", vocab_size=len(tok), hidden_size=32, ffn_hidden_size=64,
                     num_layers=2, num_attention_heads=4, num_query_groups=2, head_dim=8,
                     qk_layernorm=True)
    return LocalEngine.from_arch(arch, tokenizer=tok, init_seed=args.seed, seed=seed,
                                 max_batch_size=args.max_batch_size)


# ----- /generate -----

def _error(message: str, status: int = 400) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)


async def batch_worker(state: ServerState) -> None:
    """Runs everything that arrived together as one generation call and one scoring call
    (no continuous batching); requests aborted meanwhile are skipped, hung ones never run."""
    from megatron_s2lpo.rollout.engine import GenerateRequest
    from megatron_s2lpo.rollout.scoring import ScoreRequest

    loop = asyncio.get_running_loop()
    while True:
        items = [await state.queue.get()]
        while not state.queue.empty() and len(items) < state.args.max_batch_size:
            items.append(state.queue.get_nowait())
        # The simulated decode starts when the batch's last request arrived (a server with continuous
        # batching starts a request on arrival, not after the compute of the batch before it) ...
        started = max(arrived for *_, arrived in items)
        if not state.running.is_set():
            await state.running.wait()
            started = loop.time()  # ... or when generation resumed: nothing decodes while paused
        items = [(req, fut, hang) for req, fut, hang, _ in items if not fut.done() and not hang]
        for req, fut, _ in items:
            if req is None:
                fut.set_result(None)  # prefill without input log-probs: nothing to compute
        for kind, run in ((GenerateRequest, state.engine.generate), (ScoreRequest, state.engine.score)):
            group = [(req, fut) for req, fut, _ in items if isinstance(req, kind)]
            if not group:
                continue
            try:
                results = await asyncio.to_thread(run, [req for req, _ in group])
            except Exception as err:  # noqa: BLE001 - reported to every waiting request
                for _, fut in group:
                    if not fut.done():
                        fut.set_exception(err)
                continue
            steps = max(len(r.token_ids) for r in results) if kind is GenerateRequest else 0
            release(state, [fut for _, fut in group], results, started, steps)  # the next batch goes on


def release(state: ServerState, futs: list[asyncio.Future], results: list, started: float, steps: int) -> None:
    """Answer `futs` with `results` once `steps` simulated decode steps since `started` have passed
    (at once without --latency-ms-per-token); a held batch is counted in /_test/state's decoding and num_held."""
    if not (steps and state.latency_s_per_token):
        _answer(futs, results)
        return

    async def held() -> None:
        await simulated_decode(state, futs, started, steps)
        _answer(futs, results)

    task = asyncio.get_running_loop().create_task(held())
    state.num_held += 1
    state.decoding.add(task)  # a reference until it ends (the loop keeps only weak ones)
    task.add_done_callback(state.decoding.discard)


async def generate(request: web.Request) -> web.Response:
    state: ServerState = request.app["state"]
    state.num_generate += 1
    if state.fail_next > 0:
        state.fail_next -= 1
        state.num_failed += 1
        return _error("injected failure (protocol test server)", state.fail_status)
    body = await request.json()
    if body.get("stream"):
        return _error("stream=true is not supported by the protocol test server")
    try:
        if state.contract is not None:
            state.contract.check_generate(body, state)
        single, rids, reqs, batch, params, logprob = _parse_batch(state, body)
    except (ValueError, TypeError) as err:
        return _error(str(err))
    duplicate = next((rid for rid in rids if rid in state.inflight), None)
    if duplicate is not None:  # SGLang: TokenizerManager._init_req_state
        return _error(f"Duplicate request ID detected: {duplicate}")
    loop = asyncio.get_running_loop()
    futs = [loop.create_future() for _ in rids]
    hangs = [False] * len(rids)
    for i, (rid, fut) in enumerate(zip(rids, futs)):
        state.inflight[rid] = fut
        if state.hang_next > 0:
            state.hang_next -= 1
            hangs[i] = True
    try:
        await state.running.wait()  # held while paused
        outs = await _serve(state, rids, reqs, batch, params, logprob, futs, hangs)
    except ValueError as err:
        return _error(str(err))
    finally:
        for rid in rids:
            state.inflight.pop(rid, None)
    outs = [out if state.contract is None else state.contract.encode_generate(out) for out in outs]
    state.completed += [o["meta_info"]["id"] for o in outs if o["meta_info"]["finish_reason"]["type"] != "abort"]
    if state.truncate_next > 0:
        state.truncate_next -= 1
        text = json.dumps(outs[0] if single else outs)
        return web.Response(text=text[: len(text) // 2], content_type="application/json")
    return web.json_response(outs[0] if single else outs)


async def _serve(state: ServerState, rids, reqs, batch, params, logprob, futs, hangs) -> list[dict]:
    if state.delay_s:
        sleeper = asyncio.ensure_future(asyncio.sleep(state.delay_s))
        await asyncio.wait([sleeper, *futs], return_when=asyncio.FIRST_COMPLETED)
        sleeper.cancel()
    if state.engine is None:  # no model: fixed answers, unless aborted or hung
        live = [(fut, _noop_output(state, *item))
                for fut, hang, item in zip(futs, hangs, zip(rids, batch, params, logprob)) if not fut.done() and not hang]
        steps = max((out["meta_info"]["completion_tokens"] for _, out in live), default=0)
        release(state, [fut for fut, _ in live], [out for _, out in live], asyncio.get_running_loop().time(), steps)
        results = await asyncio.gather(*futs)
        return [_abort_output(state, rid, lp) if res is ABORTED else res
                for rid, lp, res in zip(rids, logprob, results)]
    arrived = asyncio.get_running_loop().time()
    for req, fut, hang in zip(reqs, futs, hangs, strict=True):
        state.queue.put_nowait((req.work() if isinstance(req, Prefill) else req, fut, hang, arrived))
    results = await asyncio.gather(*futs)
    return [_abort_output(state, rid, lp) if res is ABORTED else
            _format_prefill(state, r, res) if isinstance(r, Prefill) else _format(state, r, res)
            for rid, lp, r, res in zip(rids, logprob, reqs, results, strict=True)]


# ----- control routes -----

async def health(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def health_generate(request: web.Request) -> web.Response:
    state: ServerState = request.app["state"]
    if state.engine is not None and state.running.is_set():
        from megatron_s2lpo.rollout.engine import GenerateRequest

        req = GenerateRequest(request_id="HEALTH_CHECK", prompt_ids=[0], top_k=1, max_new_tokens=1)
        await asyncio.to_thread(state.engine.generate, [req])
    return web.Response(status=200)


async def _body(request: web.Request, route: str) -> dict:
    """The JSON body, checked with SGLang's own request type in contract mode (ValueError)."""
    state: ServerState = request.app["state"]
    body = await request.json() if request.can_read_body else {}
    if state.contract is not None:
        state.contract.check(route, body if body is not None else {}, state)
    return body or {}


def _deprecated(handler, alias: str, target: str):
    async def wrapped(request: web.Request) -> web.Response:
        state: ServerState = request.app["state"]
        state.num_deprecated += 1
        print(f"protocol server: Endpoint '{alias}' is deprecated and will be removed in a future version. "
              f"Please use '{target}' instead.", flush=True)
        return await handler(request)
    return wrapped


async def model_info(request: web.Request) -> web.Response:
    state: ServerState = request.app["state"]
    cfg = state.engine.model.config if state.engine is not None else None
    return web.json_response({
        "model_path": state.model_path, "served_model_name": state.model_path,
        "tokenizer_path": state.model_path, "is_generation": True,
        "preferred_sampling_params": None, "weight_version": state.weight_version,
        "load_format": "auto", "model_type": getattr(cfg, "model_type", None),
        "architectures": getattr(cfg, "architectures", None),
    })


async def server_info(request: web.Request) -> web.Response:
    state: ServerState = request.app["state"]
    a = state.args
    return web.json_response({"model_path": state.model_path, "port": a.port, "tp_size": a.tp_size,
                              "dp_size": a.dp_size, "base_gpu_id": a.base_gpu_id, "random_seed": a.random_seed,
                              "enable_deterministic_inference": a.enable_deterministic_inference,
                              "version": "protocol-test-server", "internal_states": [{}]})


async def flush_cache(request: web.Request) -> web.Response:
    if request.app["state"].inflight:  # SGLang flushes only an idle scheduler
        return web.Response(text="Flush cache failed.\n", status=400)
    return web.Response(text="Cache flushed.\nPlease check backend logs for more details. "
                             "(When there are running or waiting requests, the operation will "
                             "not be performed.)\n")


async def update_weights_from_disk(request: web.Request) -> web.Response:
    state: ServerState = request.app["state"]
    try:
        body = await _body(request, "/update_weights_from_disk")
    except ValueError as err:
        return _error(str(err))
    path = body.get("model_path")
    try:
        if state.engine is not None:
            await asyncio.to_thread(state.engine.update_weights_from_disk, path, None)
    except (ValueError, FileNotFoundError, OSError) as err:
        return web.json_response({"success": False, "message": f"Failed to update weights: {err}",
                                  "num_paused_requests": 0}, status=400)
    state.model_path = path
    message = "Succeeded to update model weights."
    if body.get("weight_version") is not None:
        state.weight_version = body["weight_version"]
        message += f" Weight version updated to {state.weight_version}."
    if body.get("flush_cache", True) and state.inflight:
        return web.json_response({"success": False, "num_paused_requests": 0, "message": (
            "Weights were updated, but the cache was not flushed because requests are still running or "
            "queued. Retract or finish them, then call /flush_cache.")}, status=400)
    return web.json_response({"success": True, "message": message, "num_paused_requests": 0})


async def update_weight_version(request: web.Request) -> web.Response:
    state: ServerState = request.app["state"]
    body = await _body(request, "/update_weight_version")
    state.weight_version = body["new_version"]
    return web.json_response({"success": True, "new_version": state.weight_version,
                              "message": f"Weight version updated to {state.weight_version}"})


def _weights_route(route: str, method: str):
    """A weight-update route: the backend's (success, message) as SGLang answers it."""
    async def handler(request: web.Request) -> web.Response:
        state: ServerState = request.app["state"]
        try:
            body = await _body(request, route)
        except ValueError as err:
            return _error(str(err))
        ok, message = await asyncio.to_thread(getattr(state.weights, method), body)
        if ok and body.get("weight_version") is not None and method.startswith("update"):
            message += f" Weight version updated to {body['weight_version']}."
        return web.json_response({"success": ok, "message": message}, status=200 if ok else 400)
    return handler


async def pause_generation(request: web.Request) -> web.Response:
    state: ServerState = request.app["state"]
    body = await _body(request, "/pause_generation")
    state.running.clear()
    if body.get("mode", "abort") == "abort":  # SGLang: abort every running request, wait until none runs
        while state.inflight:
            state.abort()
            await asyncio.sleep(0.01)
    return web.json_response({"message": "Generation paused successfully.", "status": "ok"})


async def continue_generation(request: web.Request) -> web.Response:
    state: ServerState = request.app["state"]
    await _body(request, "/continue_generation")
    state.running.set()
    return web.json_response({"message": "Generation continued successfully.", "status": "ok"})


async def abort_request(request: web.Request) -> web.Response:
    state: ServerState = request.app["state"]
    body = await _body(request, "/abort_request")
    state.abort(None if body.get("abort_all") else body.get("rid") or "")
    return web.Response(status=200)


async def _tags(request: web.Request, route: str) -> set[str]:
    body = await _body(request, route)
    return set(body.get("tags") or ["weights", "kv_cache"])


async def release_memory(request: web.Request) -> web.Response:
    state: ServerState = request.app["state"]
    if state.inflight:  # SGLang asserts is_fully_idle() and answers the AssertionError
        return _error("release_memory_occupation should be called only when server is idle.")
    state.released |= await _tags(request, "/release_memory_occupation")
    return web.json_response(None)


async def resume_memory(request: web.Request) -> web.Response:
    request.app["state"].released -= await _tags(request, "/resume_memory_occupation")
    return web.json_response(None)


async def test_faults(request: web.Request) -> web.Response:
    state: ServerState = request.app["state"]
    body = await request.json()
    state.fail_next = int(body.get("fail_next", state.fail_next))
    state.fail_status = int(body.get("status", state.fail_status))
    state.delay_s = float(body.get("delay_s", state.delay_s))
    state.latency_s_per_token = float(body.get("latency_ms_per_token", 1000 * state.latency_s_per_token)) / 1000
    state.hang_next = int(body.get("hang_next", state.hang_next))
    state.truncate_next = int(body.get("truncate_next", state.truncate_next))
    if body.get("clear_violations"):
        state.violations.clear()
    if "refuse_updates" in body and hasattr(state.weights, "refuse_next"):
        state.weights.refuse_next = int(body["refuse_updates"])
    return web.json_response({"ok": True})


async def test_state(request: web.Request) -> web.Response:
    state: ServerState = request.app["state"]
    weights = state.weights
    return web.json_response({
        "num_generate": state.num_generate, "num_failed": state.num_failed, "num_aborted": state.num_aborted,
        "num_deprecated": state.num_deprecated, "completed": state.completed, "inflight": sorted(state.inflight),
        "decoding": len(state.decoding), "num_held": state.num_held,
        "paused": not state.running.is_set(), "released": sorted(state.released),
        "weight_version": state.weight_version, "memory_saver": state.args.enable_memory_saver,
        "session_open": bool(getattr(weights, "session_open", False)),
        "groups": sorted(getattr(weights, "groups", {})), "violations": state.violations,
        "contract": state.contract is not None, "sglang_args": state.sglang_args, "pid": os.getpid()})


@web.middleware
async def auth(request: web.Request, handler):
    key = request.app["state"].args.api_key
    if key and not request.path.startswith("/health") and \
            request.headers.get("Authorization", "") != f"Bearer {key}":
        return web.json_response({"error": "Unauthorized"}, status=401)
    return await handler(request)


@web.middleware
async def json_only(request: web.Request, handler):
    """SGLang 0.5.23 (checked on the real server) refuses a POST body sent without
    `Content-Type: application/json` with 400, even a valid one (FastAPI then hands the route raw
    bytes); a POST without a body is accepted. The test server's own /_test routes are exempt."""
    if request.method == "POST" and request.can_read_body and request.content_type != "application/json" \
            and not request.path.startswith("/_test"):
        await request.read()
        return _error(f"1 validation error: POST {request.path}: Input should be a dictionary (the body was sent "
                      f"as {request.content_type or 'no content type'}, not application/json)")
    return await handler(request)


WEIGHT_ROUTES = {  # route -> ProtocolWeights / contract backend method
    "/begin_weight_update": "begin", "/end_weight_update": "end",
    "/update_weights_from_tensor": "update_from_tensor", "/init_weights_update_group": "init_group",
    "/update_weights_from_distributed": "update_from_distributed",
    "/destroy_weights_update_group": "destroy_group",
}


def build_app(state: ServerState) -> web.Application:
    app = web.Application(middlewares=[auth, json_only], client_max_size=256 * 1024 * 1024)
    app["state"] = state
    r = app.router
    r.add_post("/generate", generate)
    r.add_put("/generate", generate)
    for path, fn in (("/health", health), ("/health_generate", health_generate),
                     ("/get_model_info", _deprecated(model_info, "/get_model_info", "/model_info")),
                     ("/model_info", model_info), ("/server_info", server_info),
                     ("/get_server_info", _deprecated(server_info, "/get_server_info", "/server_info")),
                     ("/_test/state", test_state)):
        r.add_get(path, fn)
    for path, fn in (("/flush_cache", flush_cache), ("/release_memory_occupation", release_memory),
                     ("/resume_memory_occupation", resume_memory)):
        r.add_get(path, fn)
        r.add_post(path, fn)
    for path, fn in (("/update_weights_from_disk", update_weights_from_disk),
                     ("/update_weight_version", update_weight_version),
                     ("/pause_generation", pause_generation),
                     ("/continue_generation", continue_generation),
                     ("/abort_request", abort_request),
                     ("/_test/faults", test_faults)):
        r.add_post(path, fn)
    for path, method in WEIGHT_ROUTES.items():
        r.add_post(path, _weights_route(path, method))

    async def start_worker(app: web.Application) -> None:
        if state.engine is not None:
            app["worker"] = asyncio.create_task(batch_worker(state))

    app.on_startup.append(start_worker)
    return app


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", default="")
    p.add_argument("--tiny", action="store_true", help="random tiny Qwen3 + synthetic tokenizer")
    p.add_argument("--noop", action="store_true", help="no model: fixed tokens (benchmarks)")
    p.add_argument("--noop-tokens", type=int, default=16)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--api-key", default="")
    p.add_argument("--weight-version", default="default")
    p.add_argument("--fail-first", type=int, default=0)
    p.add_argument("--delay-s", type=float, default=0.0)
    p.add_argument("--latency-ms-per-token", type=float, default=0.0,
                   help="simulated decode time: a generation batch answers no sooner than this x its "
                        "longest completion after it started")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="the tiny model's init seed (and the stream's)")
    p.add_argument("--num-threads", type=int, default=1)
    p.add_argument("--random-seed", type=int, default=None)
    p.add_argument("--enable-deterministic-inference", action="store_true")
    p.add_argument("--sglang-source", default="", help="contract mode: SGLang's unpacked wheel")
    # sglang.launch_server flags that have no meaning here (accepted so launch lines match)
    p.add_argument("--tp-size", type=int, default=1)
    p.add_argument("--dp-size", type=int, default=1)
    p.add_argument("--base-gpu-id", type=int, default=0)
    p.add_argument("--mem-fraction-static", type=float, default=0.8)
    p.add_argument("--enable-memory-saver", action="store_true")
    args, unknown = p.parse_known_args(argv)
    if unknown:
        print(f"protocol server: ignoring flags {unknown}", flush=True)
    if args.latency_ms_per_token < 0:
        p.error(f"--latency-ms-per-token must be >= 0, got {args.latency_ms_per_token}")
    if not args.noop and bool(args.model_path) == args.tiny:
        p.error("give exactly one of --model-path DIR or --tiny (or --noop, which loads no model)")
    return args, unknown


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args, _ = parse_args(argv)
    start = time.time()

    async def make_app() -> web.Application:
        from protocol_weights import ProtocolWeights

        state = ServerState(args)
        if not args.noop:
            state.engine = await asyncio.to_thread(build_engine, args)
        state.weights = ProtocolWeights(state.engine, tp_size=args.tp_size, is_idle=lambda: not state.inflight,
                                        set_version=state.set_version)
        if args.sglang_source:  # SGLang's own code checks and serves the weight updates
            sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "contract"))
            from sglang_backend import ContractBackend

            state.contract = await asyncio.to_thread(ContractBackend, args.sglang_source, argv, state)
            state.weights = state.contract
        print(f"protocol server: model {state.model_path} ready in {time.time() - start:.1f} s on "
              f"http://{args.host}:{args.port} ({json.dumps({'weight_version': args.weight_version})})",
              flush=True)
        return build_app(state)

    # A test double has nothing to flush: leave at once on SIGTERM (a graceful aiohttp shutdown and
    # torch's teardown take seconds, and every test that stops a server would wait for them).
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    web.run_app(make_app(), host=args.host, port=args.port, print=None, access_log=None,
                shutdown_timeout=2.0, handle_signals=False)


if __name__ == "__main__":
    main()
