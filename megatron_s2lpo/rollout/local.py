"""In-process rollout engine: a transformers causal LM that behaves like an SGLang server.

The CPU default for demos and tests, and the model inside the SGLang-protocol test server.
It samples like SGLang (temperature, then top-k / top-p support, stop token ids, stop
strings, max_new_tokens), returns SGLang's behaviour log-probs (log_softmax(logits / T) of
the sampled token, before top-k / top-p renormalisation) and receives weights through the
same HF-named paths as an SGLang server: `update_weights_from_tensors` (buckets of
(name, tensor)) and `update_weights_from_disk` (a safetensors HF directory).

Sampling is a plain KV-cached loop over `model(input_ids, past_key_values=...)` with left
padding, an attention mask and explicit position ids, so the log-probs equal a fresh
teacher-forced forward pass of the same model (fp32, within 1e-5). `score` is that
teacher-forced pass itself (prefill scoring of given responses for distillation, scoring.py).

Mixture-of-experts models (Qwen3-MoE): transformers keeps each layer's experts fused in two
3-D parameters (`experts.gate_up_proj`, `experts.down_proj`); the engine accepts them under the
checkpoint's per-expert names (`mlp.experts.{e}.{gate,up,down}_proj.weight`, the names SGLang
loads), writing into views of the fused tensors. A request with `return_routed_experts` gets the
top-k experts every router chose for each token the model ran, as SGLang 0.5.23 returns them
(`meta_info.routed_experts`: prompt and response tokens but the last, all layers).

Determinism: a request with `seed` draws from its own generator seeded with it; requests
without one draw from generators seeded from the engine's `seed`, so the same calls in the
same order give the same samples. (Batch composition changes padding, which can move logits
by ~1e-7 and, very rarely, flip a sample; SGLang gives no stronger guarantee.)
"""

from __future__ import annotations

import asyncio
import glob
import os
import threading
from collections.abc import Callable, Iterable

import torch

from ..config.model import ModelArch
from .routing_record import RoutingRecorder, expert_views
from ..types import FinishReason
from .engine import Completion, GenerateRequest
from .scoring import ScoreRequest, TokenScores

Tensor = torch.Tensor


def support_mask(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Tokens that top-k then top-p keep, as SGLang's torch sampler selects them.

    probs: (B, V) softmax(logits / T); top_k: (B,) long (>= V keeps all); top_p: (B,) float.
    Returns (B, V) bool. Sorted descending, a token is dropped if its rank >= top_k or if the
    mass strictly before it (in the sorted order, before top-k zeroing) exceeds top_p; the
    most likely token is always kept.
    """
    probs_sort, order = probs.sort(dim=-1, descending=True)  # (B, V)
    mass_before = probs_sort.cumsum(dim=-1) - probs_sort  # (B, V)
    ranks = torch.arange(probs.shape[-1], device=probs.device).unsqueeze(0)  # (1, V)
    keep_sorted = (ranks < top_k.unsqueeze(-1)) & (mass_before <= top_p.unsqueeze(-1))
    keep = torch.zeros_like(keep_sorted)
    keep.scatter_(-1, order, keep_sorted)
    return keep


class LocalEngine:
    """A `RolloutEngine` backed by an in-process transformers model (fp32, or bf16 with `dtype`)."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        tokenizer=None,
        eos_token_ids: Iterable[int] | None = None,
        seed: int = 0,
        max_batch_size: int = 64,
        weight_version: int = 0,
        model_id: str = "",
        dtype: str = "float32",
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"engine dtype must be float32 or bfloat16, got {dtype!r}")
        self.model = model.to(getattr(torch, dtype)).eval()  # log-probs are taken in fp32 either way
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(_default_eos(model, tokenizer) if eos_token_ids is None
                                       else eos_token_ids)
        pad = getattr(model.config, "pad_token_id", None)
        if pad is None and tokenizer is not None:
            pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else 0
        self.max_batch_size = max_batch_size
        self.model_id = model_id
        self._version = weight_version
        self._rng = torch.Generator().manual_seed(seed)
        self._lock = threading.RLock()  # one generation or weight update at a time
        self._closed = False
        # Every tensor name the engine accepts (tied weights appear under both names; fused
        # experts under their per-expert checkpoint names).
        experts, fused = expert_views(self.model)
        self._params = {n: t for n, t in self.model.state_dict(keep_vars=True).items() if n not in fused}
        self._params.update(experts)
        self._required = {name for name, _ in self.model.named_parameters() if name not in fused} | set(experts)
        self._routing = RoutingRecorder(self.model)

    # ----- construction -----

    @classmethod
    def from_pretrained(cls, path: str, *, tokenizer=None, **kwargs) -> "LocalEngine":
        """Load a HF model directory (local files only); its tokenizer too if it has one."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"no Hugging Face model at {path}: expected {path}/config.json")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
        if tokenizer is None and os.path.isfile(os.path.join(path, "tokenizer_config.json")):
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        kwargs.setdefault("model_id", os.path.abspath(path))
        return cls(model, tokenizer=tokenizer, **kwargs)

    @classmethod
    def from_arch(cls, arch: ModelArch, *, init_seed: int = 0, tokenizer=None, **kwargs) -> "LocalEngine":
        """A randomly initialised model of `arch` (deterministic in `init_seed`)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = arch.to_hf_config_dict()
        model_type = cfg.pop("model_type")
        if tokenizer is not None:
            cfg.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        config = AutoConfig.for_model(model_type, **cfg)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        kwargs.setdefault("model_id", f"{arch.family}-h{arch.hidden_size}-l{arch.num_layers}-init{init_seed}")
        return cls(model, tokenizer=tokenizer, **kwargs)

    def save_pretrained(self, path: str) -> None:
        """Write the model (safetensors) and tokenizer as a HF directory."""
        with self._lock:
            self.model.save_pretrained(path, safe_serialization=True)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(path)

    # ----- RolloutEngine -----

    @property
    def weight_version(self) -> int:
        return self._version

    def generate(self, requests: list[GenerateRequest]) -> list[Completion]:
        return self._in_batches(self._generate_batch, requests)

    async def agenerate(self, requests: list[GenerateRequest]) -> list[Completion]:
        return await asyncio.to_thread(self.generate, requests)

    def score(self, requests: list[ScoreRequest]) -> list[TokenScores]:
        """Teacher scores of given responses (scoring.py): one teacher-forced forward pass per
        `max_batch_size` requests, log_softmax at temperature 1 in float32."""
        return self._in_batches(self._score_batch, requests)

    def update_weights_from_tensors(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, flush: bool = True
    ) -> None:
        """Copy HF-named tensors into the model (one bucket; checked before anything is copied).

        `flush` is accepted for parity with SGLang (it flushes the radix cache there; this
        engine keeps no cache between requests).
        """
        self._check_open()
        self._load(list(named_tensors), version, require_all=False, where="update_weights_from_tensors")

    def update_weights_from_disk(self, path: str, version: int | None) -> None:
        """Reload every weight from the safetensors files of HF directory `path`."""
        from safetensors import safe_open

        self._check_open()
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise FileNotFoundError(f"update_weights_from_disk: no *.safetensors files in {path}")
        named: list[tuple[str, torch.Tensor]] = []
        for file in files:
            with safe_open(file, framework="pt") as f:
                named.extend((name, f.get_tensor(name)) for name in f.keys())
        self._load(named, version, require_all=True, where=f"update_weights_from_disk({path})")

    def offload(self) -> None:
        """In-process engine on the learner's own CPU memory: nothing to hand over."""

    def onload(self) -> None:
        """See `offload`."""

    def health(self) -> bool:
        return not self._closed

    def close(self) -> None:
        self._closed = True

    # ----- internals -----

    def _in_batches(self, run_batch: Callable[[list], list], requests: list) -> list:
        """run_batch over chunks of at most max_batch_size requests, results in request order."""
        self._check_open()
        out: list = []
        with self._lock, torch.inference_mode():
            for start in range(0, len(requests), self.max_batch_size):
                out.extend(run_batch(requests[start:start + self.max_batch_size]))
        return out

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("LocalEngine is closed")

    def _load(self, named: list[tuple[str, torch.Tensor]], version: int | None, *,
              require_all: bool, where: str) -> None:
        for name, tensor in named:
            target = self._params.get(name)
            if target is None:
                raise ValueError(f"{where}: unknown tensor name {name!r}; expected Hugging Face names "
                                 f"such as {sorted(self._params)[:3]}")
            if tuple(tensor.shape) != tuple(target.shape):
                raise ValueError(f"{where}: tensor {name!r} has shape {tuple(tensor.shape)}, the "
                                 f"model expects {tuple(target.shape)}")
            if not tensor.is_floating_point():
                raise ValueError(f"{where}: tensor {name!r} has dtype {tensor.dtype}, expected floats")
        if require_all:
            missing = sorted(self._required - {name for name, _ in named}
                             - _tied_aliases(self.model, {name for name, _ in named}))
            if missing:
                raise ValueError(f"{where}: {len(missing)} weights missing, e.g. {missing[:3]}")
        with self._lock, torch.no_grad():
            for name, tensor in named:
                self._params[name].copy_(tensor.to(device=self._params[name].device))
            if version is not None:
                self._version = int(version)

    def _generate_batch(self, requests: list[GenerateRequest]) -> list[Completion]:
        from transformers import DynamicCache

        num_rows = len(requests)
        device = next(self.model.parameters()).device
        vocab = self.model.config.vocab_size
        prompt_len = max(len(r.prompt_ids) for r in requests)
        input_ids = torch.full((num_rows, prompt_len), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((num_rows, prompt_len), dtype=torch.long)
        for row, req in enumerate(requests):  # left padding: every row's last token is aligned
            bad = [t for t in req.prompt_ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"request {req.request_id!r}: prompt token ids {bad[:5]} are outside "
                                 f"the model's vocabulary of {vocab}")
            input_ids[row, prompt_len - len(req.prompt_ids):] = torch.tensor(req.prompt_ids)
            mask[row, prompt_len - len(req.prompt_ids):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, P)
        temps = torch.tensor([[r.temperature] for r in requests], dtype=torch.float32)  # (B, 1)
        top_k = torch.tensor([vocab if r.top_k == -1 else r.top_k for r in requests])  # (B,)
        top_p = torch.tensor([r.top_p for r in requests], dtype=torch.float32)  # (B,)
        gens = [self._generator(r) for r in requests]
        stops = [self.eos_token_ids | set(r.stop_token_ids) for r in requests]
        tokens: list[list[int]] = [[] for _ in requests]
        logps: list[list[float]] = [[] for _ in requests]
        finish: list[FinishReason | None] = [None] * num_rows
        stop_texts: list[str | None] = [None] * num_rows  # text trimmed at a matched stop string

        cache = DynamicCache()
        step_ids, step_pos = input_ids.to(device), positions.to(device)
        mask = mask.to(device)
        record = any(r.return_routed_experts for r in requests)
        if record and not self._routing.routers:
            raise ValueError("return_routed_experts needs a mixture-of-experts model; this engine's model has no "
                             "routers")
        routes: list[Tensor] = []  # (B, S, layers * k) per forward
        for _ in range(max(r.max_new_tokens for r in requests)):
            with self._routing.recording(record) as recorded:
                out = self.model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                                 past_key_values=cache, use_cache=True, logits_to_keep=1)
            if record:
                routes.append(recorded.stacked(num_rows))
            cache = out.past_key_values
            logprobs = torch.log_softmax(out.logits[:, -1, :].float().cpu() / temps, dim=-1)  # (B, V)
            probs = logprobs.exp()
            keep = support_mask(probs, top_k, top_p)  # (B, V)
            next_ids = torch.full((num_rows,), self.pad_token_id, dtype=torch.long)
            for row, req in enumerate(requests):
                if finish[row] is not None:
                    continue
                token = int(torch.multinomial(probs[row] * keep[row], 1, generator=gens[row]))
                next_ids[row] = token
                tokens[row].append(token)
                logps[row].append(float(logprobs[row, token]))
                finish[row], stop_texts[row] = self._check_finish(req, tokens[row], stops[row])
            if all(f is not None for f in finish):
                break
            step_ids = next_ids.unsqueeze(-1).to(device)  # (B, 1)
            step_pos = step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones((num_rows, 1), dtype=mask.dtype, device=device)], dim=-1)

        return [
            Completion(request_id=req.request_id, prompt_ids=list(req.prompt_ids), token_ids=tokens[row],
                       text=self._decode(tokens[row]) if stop_texts[row] is None else stop_texts[row],
                       logprobs=logps[row], finish_reason=finish[row] or FinishReason.LENGTH,
                       weight_version=self._version,
                       routed_experts=_row_routes(routes, row, len(req.prompt_ids), len(tokens[row]))
                       if req.return_routed_experts else None)
            for row, req in enumerate(requests)
        ]

    def _score_batch(self, requests: list[ScoreRequest]) -> list[TokenScores]:
        device = next(self.model.parameters()).device
        vocab = self.model.config.vocab_size
        seqs = [list(r.prompt_ids) + list(r.response_ids) for r in requests]
        for req, seq in zip(requests, seqs):
            bad = [t for t in seq if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"score request {req.request_id!r}: token ids {bad[:5]} are outside "
                                 f"the model's vocabulary of {vocab}")
            if req.top_k > vocab:
                raise ValueError(f"score request {req.request_id!r}: top_k={req.top_k} exceeds the "
                                 f"model's vocabulary of {vocab}")
        # Left padding, as in generation: every row ends at the last column, so the logits that
        # predict the responses are the last (longest response + 1) columns and only those are
        # materialised (logits_to_keep), not the (B, L, V) logits of the prompts.
        seq_len = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), seq_len), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), seq_len), dtype=torch.long)
        for row, seq in enumerate(seqs):
            input_ids[row, seq_len - len(seq):] = torch.tensor(seq)
            mask[row, seq_len - len(seq):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, L)
        keep = max(len(r.response_ids) for r in requests) + 1
        logits = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                            position_ids=positions.to(device), logits_to_keep=keep).logits  # (B, keep, V)
        out = []
        for row, req in enumerate(requests):
            num = len(req.response_ids)
            # Column -1 predicts the token after the sequence; -(num + 1) .. -2 predict the response.
            logp = torch.log_softmax(logits[row, -(num + 1):-1].float().cpu(), dim=-1)  # (R, V)
            targets = torch.tensor(req.response_ids).unsqueeze(-1)  # (R, 1)
            top_ids = top_logprobs = None
            if req.top_k:
                values, ids = logp.topk(req.top_k, dim=-1)  # (R, k), sorted descending
                top_ids, top_logprobs = ids.tolist(), values.tolist()
            out.append(TokenScores(request_id=req.request_id,
                                   logprobs=logp.gather(-1, targets).squeeze(-1).tolist(),
                                   top_ids=top_ids, top_logprobs=top_logprobs))
        return out

    def _check_finish(self, req: GenerateRequest, tokens: list[int],
                      stops: set[int]) -> tuple[FinishReason | None, str | None]:
        """(finish reason or None, text trimmed at a matched stop string or None)."""
        if tokens[-1] in stops:
            return FinishReason.STOP, None
        if req.stop:
            if self.tokenizer is None:
                raise ValueError(f"request {req.request_id!r} has stop strings {req.stop} but the "
                                 "engine has no tokenizer to decode with; pass tokenizer=")
            # A stop string of n characters ends within the last n + 1 tokens: decode only those.
            window = max(len(s) for s in req.stop) + 1
            if any(s in self._decode(tokens[-window:]) for s in req.stop):
                text = self._decode(tokens)
                cut = min((text.find(s) for s in req.stop if s in text), default=len(text))
                return FinishReason.STOP, text[:cut]
        if len(tokens) >= req.max_new_tokens:
            return FinishReason.LENGTH, None
        return None, None

    def _decode(self, tokens: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _generator(self, req: GenerateRequest) -> torch.Generator:
        seed = req.seed if req.seed is not None else int(torch.randint(2**62, (1,), generator=self._rng))
        return torch.Generator().manual_seed(seed)


def _default_eos(model: torch.nn.Module, tokenizer) -> set[int]:
    eos = getattr(model.config, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}


def _tied_aliases(model: torch.nn.Module, present: set[str]) -> set[str]:
    """Parameter names satisfied through a tied twin that is present (lm_head <-> embeddings)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    pair = {"lm_head.weight", "model.embed_tokens.weight"}
    return pair if pair & present else set()



def _row_routes(routes: list[Tensor], row: int, prompt_len: int, num_tokens: int) -> Tensor:
    """Row `row`'s routing as SGLang returns it: its prompt tokens (the prefill's last prompt_len
    columns, left padding before them) and the response tokens fed back (all but the last)."""
    prefill = routes[0][row, routes[0].shape[1] - prompt_len:]  # (prompt_len, layers * k)
    fed = [step[row] for step in routes[1:num_tokens]]  # decode step i fed response token i - 1
    return torch.cat([prefill, *fed]).to(torch.int16)
