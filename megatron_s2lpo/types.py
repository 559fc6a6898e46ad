"""Hand-off objects between the stages: data -> rollout -> reward -> algo -> learner.

They are deliberately small and typed. Per-token values travel as Python lists between
processes (HTTP, jsonl stores) and become tensors only in `TrainBatch`.

Alignment convention used everywhere in the project: a per-token tensor of shape (B, T) is
aligned with `TrainBatch.tokens`; entry [b, t] refers to token t, i.e. its log-prob given
tokens[b, :t]. Entry 0 and all prompt tokens carry loss_mask 0.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch


class Source(enum.Enum):
    """Which model sampled a rollout."""

    LEARNER = "learner"
    EXPLORER = "explorer"


class FinishReason(enum.Enum):
    STOP = "stop"  # a stop token or stop string ended the completion
    LENGTH = "length"  # max_new_tokens reached
    ABORT = "abort"  # the engine aborted the request


@dataclass(kw_only=True, slots=True)
class Prompt:
    """One problem with a verifiable answer."""

    prompt_id: str
    text: str  # the rendered prompt, template applied
    ground_truth: str
    data_source: str = ""
    token_ids: list[int] | None = None  # filled once the tokenizer is known
    metadata: dict = field(default_factory=dict)


@dataclass(kw_only=True, slots=True)
class Rollout:
    """One sampled completion of one prompt."""

    prompt_id: str
    sample_index: int  # index within the prompt's group
    source: Source
    prompt_ids: list[int]
    response_ids: list[int]
    response_logprobs: list[float]  # behaviour log-probs of response_ids under the sampler
    finish_reason: FinishReason
    weight_version: int  # version of the weights that sampled it (explorer: always 0)
    text: str = ""  # decoded response
    loss_mask: list[int] | None = None  # per response token; None means all ones
    reward: float | None = None  # set by reward/; None means not scored yet
    # Mixture-of-experts engines: the experts the engine routed each token to, row p = token p of
    # prompt + response (the last response token is never fed back, so len - 1 rows), columns
    # layer-major (layer l's top-k ids at [l * k, (l + 1) * k)); int16. None: not recorded.
    routed_experts: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if len(self.response_logprobs) != len(self.response_ids):
            raise ValueError(
                f"rollout {self.prompt_id}/{self.sample_index}: {len(self.response_ids)} response "
                f"tokens but {len(self.response_logprobs)} log-probs; the engine must return one "
                "log-prob per sampled token"
            )
        if self.loss_mask is None:
            self.loss_mask = [1] * len(self.response_ids)
        elif len(self.loss_mask) != len(self.response_ids):
            raise ValueError(
                f"rollout {self.prompt_id}/{self.sample_index}: loss_mask has {len(self.loss_mask)} "
                f"entries for {len(self.response_ids)} response tokens"
            )
        expected = len(self.prompt_ids) + len(self.response_ids) - 1
        if self.routed_experts is not None and (self.routed_experts.dim() != 2
                                                or self.routed_experts.shape[0] != expected):
            raise ValueError(
                f"rollout {self.prompt_id}/{self.sample_index}: routed_experts has shape "
                f"{tuple(self.routed_experts.shape)}, expected ({expected}, layers * top_k): one row per "
                "prompt and response token but the last"
            )

    @property
    def num_response_tokens(self) -> int:
        return len(self.response_ids)


@dataclass(kw_only=True, slots=True)
class Group:
    """All rollouts of one prompt; advantages are normalised over the whole group, both sources."""

    prompt: Prompt
    rollouts: list[Rollout]

    def num_from(self, source: Source) -> int:
        return sum(r.source is source for r in self.rollouts)

    def rewards(self) -> list[float]:
        missing = [r.sample_index for r in self.rollouts if r.reward is None]
        if missing:
            raise ValueError(f"group {self.prompt.prompt_id}: samples {missing} have no reward yet")
        return [r.reward for r in self.rollouts]  # type: ignore[misc]


@dataclass(kw_only=True, slots=True)
class TrainBatch:
    """Right-padded sequences (prompt + response) ready for the learner.

    Shapes: B sequences, T = longest prompt+response in the batch.
    """

    tokens: torch.Tensor  # (B, T) long
    loss_mask: torch.Tensor  # (B, T) float, 1 on response tokens that enter the loss
    advantages: torch.Tensor  # (B, T) float, the sequence advantage broadcast over its tokens
    old_logprobs: torch.Tensor  # (B, T) float, log-probs the ratio is taken against
    behaviour_logprobs: torch.Tensor  # (B, T) float, log-probs returned by the sampling engine
    sources: torch.Tensor  # (B,) long, 0 = learner, 1 = explorer (see SOURCE_CODES)
    seq_lens: torch.Tensor  # (B,) long, prompt + response length (no padding)
    ref_logprobs: torch.Tensor | None = None  # (B, T) float, only with a KL penalty
    # Teacher scores of the tokens (distillation): log p_teacher(token t | tokens[:t]) ...
    teacher_logprobs: torch.Tensor | None = None  # (B, T) float
    # ... and the teacher's top-K ids / log-probs of the distribution that predicts token t.
    teacher_topk_ids: torch.Tensor | None = None  # (B, T, K) long
    teacher_topk_logprobs: torch.Tensor | None = None  # (B, T, K) float
    # Mixture of experts (learner/routing.py): the experts the sampling engine routed token t to
    # at each layer, and the routing the learner's training passes replay; -1 = none.
    routed_experts: torch.Tensor | None = None  # (B, T, layers, top_k) int16
    replay_experts: torch.Tensor | None = None  # (B, T, layers, top_k) int16

    def __post_init__(self) -> None:
        num_seqs, seq_len = self.tokens.shape
        for name in ("loss_mask", "advantages", "old_logprobs", "behaviour_logprobs", "ref_logprobs",
                     "teacher_logprobs"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (num_seqs, seq_len):
                raise ValueError(
                    f"TrainBatch.{name} has shape {tuple(value.shape)}, expected {(num_seqs, seq_len)}"
                )
        if (self.teacher_topk_ids is None) != (self.teacher_topk_logprobs is None):
            raise ValueError("TrainBatch.teacher_topk_ids and teacher_topk_logprobs come together")
        for name in ("routed_experts", "replay_experts"):
            value = getattr(self, name)
            if value is not None and (value.dim() != 4 or tuple(value.shape[:2]) != (num_seqs, seq_len)):
                raise ValueError(f"TrainBatch.{name} has shape {tuple(value.shape)}, expected "
                                 f"{(num_seqs, seq_len)} + (layers, top_k)")
        for name in ("teacher_topk_ids", "teacher_topk_logprobs"):
            value = getattr(self, name)
            if value is not None and (value.dim() != 3 or tuple(value.shape[:2]) != (num_seqs, seq_len)):
                raise ValueError(f"TrainBatch.{name} has shape {tuple(value.shape)}, expected "
                                 f"{(num_seqs, seq_len)} + (K,)")

    @property
    def num_seqs(self) -> int:
        return self.tokens.shape[0]


SOURCE_CODES = {Source.LEARNER: 0, Source.EXPLORER: 1}
