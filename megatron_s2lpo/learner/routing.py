"""Routing replay for mixture-of-experts learners: record the experts each token is routed to, and
make the routers choose given experts instead (docs/learner.md, "Routing replay").

megatron-core's TopKRouter calls `router_replay.get_replay_topk(scores, topk, ...)` for its top-k
when the attribute is set (moe_utils.topk_routing_with_score_function); `RouterReplay` is what we
put there, one per MoE layer. It always computes the router's own top-k, then, for the tokens
that carry a target, takes the target expert ids instead and GATHERS their scores from the
router's output: the routing weights of the replayed experts are the learner's own
(softmax over the chosen logits, or the chosen softmax probabilities), so the router keeps its
gradient. Tokens without a target (-1) keep the router's choice.

Order of calls. A forward step pushes one target per MoE layer (`RoutingState.before_forward`),
consumed by that layer's next router call. With activation recompute megatron runs the
checkpointed forward without grad and calls the router again in the backward (inside the
autograd engine): first-pass calls of a training schedule without grad queue their target
for that recompute, and calls inside the backward take it from there, in the same order (every
schedule does the backwards of a layer in the order of its forwards).

Token order. The router sees the (s, b, h) hidden states of one pipeline chunk flattened
s-major (token s * b + j), this TP rank's sequence slice with sequence parallelism, this CP
rank's share of every packed sequence with context parallelism. A packed
micro-batch is (1, T) with T the pack; a padded one (b, L). `token_positions` maps every routed
token to its (row, column) of the micro-batch's loss layout (-1 for a pack's padding), which is
how targets are built from (B, T, layers, k) tensors and how recorded routing goes back into one.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .batching import MicroBatch
from .context_parallel import local_token_index

Tensor = torch.Tensor
MISSING = -1  # an expert id that is not there: the router chooses for itself


def _in_backward() -> bool:
    """True inside the autograd engine (a recompute during the backward)."""
    return torch._C._current_graph_task_id() != -1


class RouterReplay:
    """One MoE layer's replay: targets to use, and the routing it saw (module docstring)."""

    def __init__(self, layer: int) -> None:
        self.layer = layer  # global layer index
        self.pending: deque[Tensor | None] = deque()  # targets of the coming first-pass calls
        self.recompute: deque[Tensor | None] = deque()  # targets kept for recompute in the backward
        self.keep_for_recompute = False  # a training schedule: no-grad first passes get recomputed
        self.recording = False
        self.recorded: list[Tensor] = []  # (tokens, k) per first-pass call, in call order

    def reset(self, *, training: bool, recording: bool) -> None:
        self.pending.clear()
        self.recompute.clear()
        self.keep_for_recompute = training
        self.recording = recording
        self.recorded = []

    def get_replay_topk(self, scores: Tensor, topk: int, num_groups: int | None = None,
                        group_topk: int | None = None, default_compute_topk: Any = None) -> tuple[Tensor, Tensor]:
        """megatron's hook: (scores of the chosen experts, their ids), each (tokens, topk)."""
        recompute = _in_backward()
        if recompute:
            target = self.recompute.popleft() if self.recompute else None
        else:
            target = self.pending.popleft() if self.pending else None
            if self.keep_for_recompute and not torch.is_grad_enabled():
                self.recompute.append(target)
        probs, indices = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        if target is not None:
            target = target.to(device=scores.device, dtype=indices.dtype)
            if target.shape != indices.shape:
                raise RuntimeError(f"routing replay of layer {self.layer}: {tuple(target.shape)} targets for "
                                   f"{tuple(indices.shape)} routed tokens; the token order is out of step")
            replay = (target[:, 0] != MISSING).unsqueeze(1)
            indices = torch.where(replay, target, indices)
            probs = scores.gather(1, indices)  # the learner's own weights of the chosen experts
        if self.recording and not recompute:
            self.recorded.append(indices.detach().to("cpu", torch.int16))
        return probs, indices


def install(chunks: list[Any]) -> list[RouterReplay]:
    """Put a RouterReplay on every MoE router of these (bare or wrapped) chunks; returns them."""
    from .model import unwrap_model

    replays = []
    for chunk in chunks:
        model = unwrap_model(chunk)
        layer_replays = []
        for layer in model.decoder.layers:
            router = getattr(getattr(layer, "mlp", None), "router", None)
            if router is None:
                continue
            router.router_replay = RouterReplay(layer.layer_number - 1)
            layer_replays.append(router.router_replay)
        model.routing_replays = layer_replays  # what before_forward pushes to, in layer order
        replays += layer_replays
    return replays


def token_positions(micro: MicroBatch, *, tp_rank: int = 0, tp_size: int = 1, sequence_parallel: bool = False,
                    cp_rank: int = 0, cp_size: int = 1) -> tuple[Tensor, Tensor]:
    """(rows, cols) of the loss layout for every token this rank's routers see, in their order;
    row -1 for a pack's padding (see the module docstring). With context parallelism a pack's
    tokens are this CP rank's share (context_parallel.local_token_index)."""
    if micro.packed is not None:
        cu = micro.packed.cu_seqlens.long()
        total = int(cu[-1])
        seq_of = torch.repeat_interleave(torch.arange(len(cu) - 1), cu[1:] - cu[:-1])  # (T,)
        cols = torch.arange(total) - cu[seq_of]
        rows = torch.where(cols < micro.seq_lens[seq_of], seq_of, torch.full_like(seq_of, -1))
        if cp_size > 1:
            local = local_token_index(micro.packed.cu_seqlens, cp_size, cp_rank)
            rows, cols = rows[local], cols[local]
        s_rows, s_cols = rows.unsqueeze(1), cols.unsqueeze(1)  # (s, b=1)
    else:
        b, length = micro.num_seqs, micro.seq_len
        s_rows = torch.arange(b).unsqueeze(0).expand(length, b)  # (s, b)
        s_cols = torch.arange(length).unsqueeze(1).expand(length, b)
    if sequence_parallel and tp_size > 1:
        share = s_rows.shape[0] // tp_size
        s_rows, s_cols = (x[tp_rank * share:(tp_rank + 1) * share] for x in (s_rows, s_cols))
    return s_rows.reshape(-1), s_cols.reshape(-1)


def sanitize(experts: Tensor, num_experts: int) -> Tensor:
    """(..., k) expert ids with every token whose ids are not k distinct experts in [0, E) set to
    MISSING (such a target would break the dispatcher's count of num_tokens * k routed copies)."""
    ids = experts.long()
    ordered = ids.sort(dim=-1).values
    valid = (ids >= 0).all(-1) & (ids < num_experts).all(-1) & (ordered[..., 1:] != ordered[..., :-1]).all(-1)
    return torch.where(valid.unsqueeze(-1), experts, torch.full_like(experts, MISSING))


@dataclass(kw_only=True, slots=True)
class RoutingState:
    """The learner's routing replay across a schedule: targets in, recorded routing out."""

    num_layers: int  # of the whole model (global layer ids index the routing's layer axis)
    top_k: int
    tp_rank: int = 0
    tp_size: int = 1
    sequence_parallel: bool = False
    cp_rank: int = 0
    cp_size: int = 1
    replay: bool = False  # push targets from the micro-batches' routing
    recording: bool = False
    _positions: dict[int, list[tuple[Tensor, Tensor, Tensor]]] = field(default_factory=dict)

    def begin(self, chunks: list[Any], *, training: bool, replay: bool, recording: bool) -> None:
        """Before a schedule: clear every router's queues and set what this schedule does."""
        from .model import unwrap_model

        self.replay, self.recording = replay, recording
        self._positions = {}
        for chunk in chunks:
            for router in getattr(unwrap_model(chunk), "routing_replays", []):
                router.reset(training=training, recording=recording)

    def before_forward(self, model: Any, micro: MicroBatch) -> None:
        """Called by the forward step of `micro` on `model` (a chunk): push its targets."""
        from .model import unwrap_model

        routers = getattr(unwrap_model(model), "routing_replays", [])
        if not routers or not (self.replay or self.recording):
            return
        rows, cols = token_positions(micro, tp_rank=self.tp_rank, tp_size=self.tp_size,
                                     sequence_parallel=self.sequence_parallel, cp_rank=self.cp_rank,
                                     cp_size=self.cp_size)
        if self.recording:
            self._positions.setdefault(id(unwrap_model(model)), []).append((micro.indices, rows, cols))
        if not self.replay:
            return
        if micro.routed_experts is None:  # keep every router's queue in step with the forwards
            for router in routers:
                router.pending.append(None)
            return
        known = rows >= 0
        safe_rows, safe_cols = rows.clamp(min=0), cols.clamp(max=micro.seq_len - 1)
        for router in routers:
            target = micro.routed_experts[safe_rows, safe_cols, router.layer].long()  # (tokens, k)
            target[~known] = MISSING
            router.pending.append(target)

    def collect(self, chunks: list[Any], num_seqs: int, seq_len: int) -> Tensor:
        """This rank's recorded routing as (B, T, num_layers, k) int16, MISSING where not seen."""
        from .model import unwrap_model

        out = torch.full((num_seqs, seq_len, self.num_layers, self.top_k), MISSING, dtype=torch.int16)
        for chunk in chunks:
            model = unwrap_model(chunk)
            calls = self._positions.get(id(model), [])
            for router in getattr(model, "routing_replays", []):
                if len(router.recorded) != len(calls):
                    raise RuntimeError(f"routing of layer {router.layer}: {len(router.recorded)} router calls "
                                       f"recorded for {len(calls)} forward steps")
                for (indices, rows, cols), recorded in zip(calls, router.recorded):
                    keep = (rows >= 0) & (cols < seq_len)
                    batch_rows = indices[rows[keep]]
                    real = batch_rows >= 0  # filler rows of uniform micro-batches
                    out[batch_rows[real], cols[keep][real], router.layer] = recorded[keep][real]
        return out


def combine_over_ranks(routing: Tensor, num_experts: int, device: torch.device) -> Tensor:
    """Every rank's partial (B, T, L, k) routing -> the whole of it on every rank.

    Ranks see disjoint rows (DP), layers (PP) or tokens (sequence parallel), and where two ranks
    see the same token (TP without SP) they saw the same routing: a MAX all-reduce over ids + 1
    (0 = missing) assembles it. uint8 when the ids fit (NCCL has no int16), int32 otherwise."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return routing
    dtype = torch.uint8 if num_experts < 255 else torch.int32
    shifted = (routing.to(torch.int32) + 1).to(dtype).to(device)
    dist.all_reduce(shifted, op=dist.ReduceOp.MAX)
    return (shifted.cpu().to(torch.int32) - 1).to(torch.int16)


def agreement(learner: Tensor, engine: Tensor, mask: Tensor) -> dict[str, float]:
    """How often the learner routes like the engine, over the (B, T) positions of `mask` where
    both have a routing: `overlap` = mean |learner's k experts & engine's| / k over (token, layer),
    `exact` = share of (token, layer) with the same set of experts."""
    seen = mask.bool().unsqueeze(-1) & (learner[..., 0] >= 0) & (engine[..., 0] >= 0)  # (B, T, L)
    if not bool(seen.any()):
        return {"overlap": float("nan"), "exact": float("nan")}
    a, b = learner[seen].long(), engine[seen].long()  # (n, k)
    common = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).sum(-1).float()  # (n,)
    k = a.shape[-1]
    return {"overlap": float(common.mean() / k), "exact": float((common == k).float().mean())}
