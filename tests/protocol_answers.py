"""The protocol test server's /generate answers, as SGLang 0.5.23 shapes them (see
protocol_server.py for the routes and the rules followed): request parsing per batch item,
sampled completions, prefill-only scoring answers, aborted requests, the --noop answers, and
when they are released (the simulated decode time of --latency-ms-per-token)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

DECODE_TICK_S = 0.01  # how often a simulated decode checks for a pause or for every request aborted


def _per_item(value, num: int, name: str) -> list:
    """A batch field: a list holds one entry per prompt, anything else applies to all."""
    if isinstance(value, list):
        if len(value) != num:
            raise ValueError(f"{name} has {len(value)} entries for a batch of {num} prompts")
        return value
    if name == "rid" and num > 1:  # SGLang expands a string rid into per-item ids
        return [f"{value}_{i}" for i in range(num)]
    return [value] * num


def _parse_batch(state: "ServerState", body: dict) -> tuple:
    """(single, rids, reqs or None, per-item fields) of a /generate body; ValueError if malformed."""
    ids = body.get("input_ids")
    if ids is None and body.get("text") is not None:
        if state.engine is None or state.engine.tokenizer is None:
            raise ValueError("text input needs a tokenizer; send input_ids")
        texts = body["text"]
        ids = ([state.engine.tokenizer.encode(t) for t in texts] if isinstance(texts, list)
               else state.engine.tokenizer.encode(texts))
    if not ids:
        raise ValueError("either text or input_ids should be provided")
    single = not isinstance(ids[0], list)
    batch = [ids] if single else ids
    params = _per_item(body.get("sampling_params") or {}, len(batch), "sampling_params")
    rids = _per_item(body.get("rid") or f"req-{state.num_generate}", len(batch), "rid")
    logprob = _per_item(body.get("return_logprob", False), len(batch), "return_logprob")
    starts = _per_item(body.get("logprob_start_len", -1), len(batch), "logprob_start_len")
    tops = _per_item(body.get("top_logprobs_num", 0), len(batch), "top_logprobs_num")
    reqs = None
    if state.engine is not None:
        seeded = state.args.enable_deterministic_inference
        items = zip(rids, batch, params, logprob, starts, tops, strict=True)
        reqs = [_to_prefill(*item) if item[2].get("max_new_tokens") == 0 else _to_request(*item[:4], seeded)
                for item in items]
        vocab = state.engine.model.config.vocab_size
        for req in reqs:
            if any(not 0 <= t < vocab for t in req.prompt_ids):
                raise ValueError(f"request {req.request_id}: token id out of vocabulary ({vocab})")
    return single, rids, reqs, batch, params, logprob


def _to_request(rid: str, ids: list[int], params: dict, return_logprob: bool, seeded: bool = True):
    from megatron_s2lpo.rollout.engine import GenerateRequest

    temperature = params.get("temperature", 1.0)
    top_k = params.get("top_k", -1)
    if temperature is not None and temperature < 1e-6:  # SGLang: greedy is top_k=1
        temperature, top_k = 1.0, 1
    stop = params.get("stop") or []
    return GenerateRequest(
        request_id=rid, prompt_ids=[int(t) for t in ids],
        temperature=1.0 if temperature is None else float(temperature),
        top_p=float(params.get("top_p") or 1.0), top_k=-1 if top_k is None else int(top_k),
        max_new_tokens=int(params.get("max_new_tokens") or 128),
        stop=[stop] if isinstance(stop, str) else list(stop),
        stop_token_ids=list(params.get("stop_token_ids") or []),
        seed=params.get("sampling_seed") if seeded else None, return_logprob=bool(return_logprob))


def _format(state: "ServerState", req, comp) -> dict:
    tokens = comp.token_ids
    if comp.finish_reason.value == "length":
        finish = {"type": "length", "length": len(tokens)}
    elif tokens and tokens[-1] in _eos(state) | set(req.stop_token_ids):
        finish = {"type": "stop", "matched": tokens[-1]}
    else:  # a stop string matched; the text is already trimmed before it
        full = state.engine.tokenizer.decode(tokens, skip_special_tokens=True)
        finish = {"type": "stop", "matched": next((s for s in req.stop if s in full), None)}
    meta = {
        "id": req.request_id, "finish_reason": finish, "prompt_tokens": len(req.prompt_ids),
        "completion_tokens": len(tokens), "cached_tokens": 0, "weight_version": state.weight_version,
    }
    if req.return_logprob:
        meta["output_token_logprobs"] = [[lp, t, None]
                                         for lp, t in zip(comp.logprobs, tokens, strict=True)]
        meta["output_token_logprobs_length"] = len(tokens)
        meta["input_token_logprobs"] = []
    return {"text": comp.text, "output_ids": tokens, "meta_info": meta}


def _eos(state: "ServerState") -> set[int]:
    return set(state.engine.eos_token_ids) if state.engine is not None else set()


def _abort_output(state: "ServerState", rid: str, logprob: bool) -> dict:
    """SGLang's answer for a request aborted before it finished (`_handle_abort_req`)."""
    meta = {"id": rid, "finish_reason": {"type": "abort", "message": "Abort in waiting queue"},
            "weight_version": state.weight_version, "completion_tokens": 0}
    if logprob:
        meta["output_token_logprobs"] = []
    return {"text": "", "output_ids": [], "meta_info": meta}


def _noop_output(state: "ServerState", rid: str, ids: list[int], params: dict, logprob: bool) -> dict:
    """A fixed answer without a model (the client benchmark's server); imports nothing heavy."""
    num = min(int(params.get("max_new_tokens") or 128), state.args.noop_tokens)
    meta = {"id": rid, "finish_reason": {"type": "length", "length": num}, "prompt_tokens": len(ids),
            "completion_tokens": num, "cached_tokens": 0, "weight_version": state.weight_version}
    if logprob:
        meta["output_token_logprobs"] = [[0.0, 5, None]] * num
    return {"text": "", "output_ids": [5] * num, "meta_info": meta}


@dataclass
class Prefill:
    """A max_new_tokens=0 request: SGLang's prefill-only path (input log-probs, no sampling).

    `start` is the resolved logprob_start_len: len(prompt_ids) when no input log-probs are
    wanted (return_logprob false, or logprob_start_len -1, SGLang's default).
    """

    request_id: str
    prompt_ids: list[int]
    return_logprob: bool
    start: int
    top_k: int

    def work(self):
        """What the engine computes: log-probs of tokens start+1 .. L-1 (entry 0 is None)."""
        from megatron_s2lpo.rollout.scoring import ScoreRequest

        if self.start >= len(self.prompt_ids) - 1:
            return None
        return ScoreRequest(request_id=self.request_id, prompt_ids=self.prompt_ids[:self.start + 1],
                            response_ids=self.prompt_ids[self.start + 1:], top_k=self.top_k)


def _to_prefill(rid: str, ids: list[int], params: dict, return_logprob: bool, start, top_k) -> Prefill:
    ids = [int(t) for t in ids]
    start = int(start) if return_logprob and start is not None else -1
    if start == -1:
        start = len(ids)
    if start < 0 or start > len(ids):  # SGLang aborts the request (scheduler.py)
        raise ValueError(f"req.logprob_start_len={start} is higher than the number of input tokens "
                         f"len(req.origin_input_ids)={len(ids)}. Please use a smaller logprob_start_len.")
    return Prefill(request_id=rid, prompt_ids=ids, return_logprob=bool(return_logprob), start=start,
                   top_k=int(top_k or 0))


def _format_prefill(state: "ServerState", req: Prefill, scores) -> dict:
    """SGLang's answer to a prefill-only request (see the module docstring)."""
    meta = {"id": req.request_id, "finish_reason": {"type": "length", "length": 0},
            "prompt_tokens": len(req.prompt_ids), "completion_tokens": 0, "cached_tokens": 0,
            "weight_version": state.weight_version}
    if req.return_logprob:
        vocab = state.engine.model.config.vocab_size
        tokens = req.prompt_ids[req.start:]  # entry j: token start + j; entry 0 has no log-prob
        values = ([None] + (scores.logprobs if scores is not None else []))[:len(tokens)]
        meta["input_token_logprobs"] = [[v, t if t < vocab - 1 else 0, None]  # SGLang's id clip
                                        for v, t in zip(values, tokens, strict=True)]
        meta["output_token_logprobs"] = []
        meta["output_token_logprobs_length"] = 0
        if req.top_k > 0:
            rows = [[[lp, i, None] for lp, i in zip(lps, ids, strict=True)]
                    for ids, lps in zip(scores.top_ids, scores.top_logprobs, strict=True)
                    ] if scores is not None else []
            meta["input_top_logprobs"] = ([None] + rows)[:len(tokens)]
            meta["output_top_logprobs"] = []
    return {"text": "", "output_ids": [], "meta_info": meta}


# ----- release -----

def _answer(futs: list[asyncio.Future], results: list) -> None:
    for fut, result in zip(futs, results, strict=True):
        if not fut.done():  # aborted meanwhile
            fut.set_result(result)


async def simulated_decode(state: "ServerState", futs: list[asyncio.Future], started: float, steps: int) -> None:
    """Wait until `steps` decode steps of --latency-ms-per-token have passed since `started` (loop
    time), not counting time paused; returns early once every future is done (all aborted)."""
    loop = asyncio.get_running_loop()
    left = steps * state.latency_s_per_token - (loop.time() - started)
    while left > 0:
        pending = [fut for fut in futs if not fut.done()]
        if not pending:
            return
        running, tick = state.running.is_set(), loop.time()
        await asyncio.wait(pending, timeout=min(left, DECODE_TICK_S))  # wakes early only if all end
        if running:
            left -= loop.time() - tick
