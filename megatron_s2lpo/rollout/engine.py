"""The rollout engine contract: requests in, completions with behaviour log-probs out.

Every engine (the in-process `LocalEngine`, the HTTP `SGLangEngine`) speaks in these objects so
that the collector, the explorer store and weight sync never see a backend detail.

Log-prob convention (the one SGLang uses, see docs/rollout.md): the log-prob of a sampled
token is `log_softmax(logits / temperature)[token]`, taken BEFORE top-p / top-k filtering and
renormalisation. It is therefore the log-prob the learner recomputes from its own logits at
the same temperature, whatever filtering the sampler applied.

Weight versions are integers here. SGLang reports them as strings (default "default"); the
clients send `str(version)` and read them back with `parse_weight_version`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from ..config.rollout import SamplingConfig
from ..types import FinishReason, Rollout, Source


@dataclass(kw_only=True, slots=True)
class GenerateRequest:
    """One completion of one tokenized prompt."""

    request_id: str
    prompt_ids: list[int]
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: whole vocabulary (SGLang's convention)
    max_new_tokens: int = 1024
    stop_token_ids: list[int] = field(default_factory=list)  # in addition to the model's eos
    stop: list[str] = field(default_factory=list)  # stop strings (matched on decoded text)
    return_logprob: bool = True
    seed: int | None = None  # per-request sampling seed; None: the engine's own stream
    return_routed_experts: bool = False  # MoE: the experts every token was routed to (Completion)

    def __post_init__(self) -> None:
        where = f"request {self.request_id!r}"
        if not self.prompt_ids:
            raise ValueError(f"{where}: prompt_ids is empty; tokenize the prompt first")
        if not 0 < self.temperature < math.inf:
            raise ValueError(f"{where}: temperature must be > 0 and finite, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"{where}: top_p must be in (0, 1], got {self.top_p}")
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"{where}: top_k must be -1 or >= 1, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"{where}: max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @classmethod
    def from_sampling(
        cls,
        request_id: str,
        prompt_ids: list[int],
        sampling: SamplingConfig,
        *,
        seed: int | None = None,
        return_routed_experts: bool = False,
    ) -> "GenerateRequest":
        return cls(
            request_id=request_id,
            prompt_ids=list(prompt_ids),
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_new_tokens=sampling.max_new_tokens,
            stop_token_ids=list(sampling.stop_token_ids),
            stop=list(sampling.stop),
            seed=seed,
            return_routed_experts=return_routed_experts,
        )

    def sampling_params(self) -> dict:
        """SGLang's `sampling_params` (field names of sglang.srt.sampling.sampling_params)."""
        params: dict = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_new_tokens": self.max_new_tokens,
        }
        if self.stop_token_ids:
            params["stop_token_ids"] = list(self.stop_token_ids)
        if self.stop:
            params["stop"] = list(self.stop)
        if self.seed is not None:
            params["sampling_seed"] = self.seed
        return params


@dataclass(kw_only=True, slots=True)
class Completion:
    """What an engine returns for one `GenerateRequest`."""

    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]  # sampled tokens, including a final eos / stop token
    text: str  # decoded response, stop string trimmed, special tokens skipped
    logprobs: list[float]  # one per token_ids entry (see the module docstring)
    finish_reason: FinishReason
    weight_version: int
    # MoE engines asked for return_routed_experts: (len(prompt) + len(tokens) - 1, layers * top_k)
    # int16, the top-k expert ids of every token the engine ran (types.Rollout.routed_experts)
    routed_experts: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if len(self.logprobs) != len(self.token_ids):
            raise ValueError(
                f"completion {self.request_id!r}: {len(self.token_ids)} tokens but "
                f"{len(self.logprobs)} log-probs; request return_logprob=True"
            )
        rows = len(self.prompt_ids) + len(self.token_ids) - 1
        if self.routed_experts is not None and (self.routed_experts.dim() != 2 or self.routed_experts.shape[0] != rows):
            raise ValueError(f"completion {self.request_id!r}: routed_experts has shape "
                             f"{tuple(self.routed_experts.shape)}, expected ({rows}, layers * top_k)")

    def to_rollout(self, *, prompt_id: str, sample_index: int, source: Source) -> Rollout:
        return Rollout(
            prompt_id=prompt_id,
            sample_index=sample_index,
            source=source,
            prompt_ids=list(self.prompt_ids),
            response_ids=list(self.token_ids),
            response_logprobs=list(self.logprobs),
            finish_reason=self.finish_reason,
            weight_version=self.weight_version,
            text=self.text,
            routed_experts=self.routed_experts,
        )


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer needs from a rollout backend (SGLang server or in-process model).

    `generate` returns one completion per request, in request order. Weight updates are
    applied between generations (an engine finishes in-flight requests first) and set
    `weight_version` to `version`.

    Optional capability, not a member of this protocol (engines and test doubles without it
    still pass isinstance checks): `score(requests: list[ScoreRequest]) -> list[TokenScores]`,
    prefill log-probs of given responses at temperature 1 (a frozen teacher for distillation;
    see scoring.py). `LocalEngine` and `SGLangEngine` have it; `TeacherScorer` requires it.
    """

    @property
    def weight_version(self) -> int: ...

    def generate(self, requests: list[GenerateRequest]) -> list[Completion]: ...

    async def agenerate(self, requests: list[GenerateRequest]) -> list[Completion]: ...

    def update_weights_from_disk(self, path: str, version: int) -> None: ...

    def update_weights_from_tensors(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, flush: bool = True
    ) -> None: ...

    def offload(self) -> None:
        """Free the engine's accelerator memory for the learner's training phase (colocated
        engines); a no-op where the engine does not share devices with the learner."""

    def onload(self) -> None:
        """Take the memory back after `offload` (before a weight update or a generation)."""

    def health(self) -> bool: ...

    def close(self) -> None: ...


def parse_weight_version(value: object, *, where: str = "engine") -> int:
    """SGLang's weight_version string -> int ("default" / missing means the initial 0)."""
    if value is None or value == "default":
        return 0
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise ValueError(
        f"{where} reports weight_version {value!r}, which is not an integer; launch the server "
        "with --weight-version 0 or update its weights through this engine"
    )


def derive_seed(*parts: object) -> int:
    """A stable 31-bit seed from any parts (same value in every process, unlike hash())."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**31 - 1)
