"""The megatron step contract: `forward_step(data_iterator, model) -> (output, loss_fn)`.

megatron-core's `get_forward_backward_func()` owns the micro-batch loop and the pipeline
schedule; it calls `forward_step` once per micro-batch on every pipeline stage and `loss_fn` on
the last stage.

The loss contract (why the numbers are exact for any micro-batch split and any DP size):
  1. `policy_loss` returns, per micro-batch, a partial sum divided by the GLOBAL normaliser of
     the whole batch (`loss_normalizer` over all rows of all DP ranks). The sum over all
     micro-batches of all DP ranks is the full-batch loss.
  2. megatron divides each micro-batch's loss by num_microbatches in place
     (`schedules.forward_step_calc_loss`, 2-tuple path) and the DDP wrapper averages gradients
     over DP ranks (gradient_scaling_factor = 1 / dp_size, `calculate_per_token_loss=False`).
  3. So `loss_fn` returns loss * num_microbatches * dp_size: after megatron's two divisions the
     accumulated gradient is exactly the gradient of the full-batch loss. With context
     parallelism every CP rank computes the whole micro-batch's loss from per-token values made
     whole over the CP group (context_parallel.py), each contributing the gradient of its own
     positions; megatron multiplies the returned loss by CP (`forward_step_calc_loss`) and
     averages gradients over DP x CP, so the factor stays num_microbatches * dp_size.
  4. The distillation objectives (`forward_kl`, `reverse_kl`, algo/distill.py) follow the
     same contract, so the same scaling applies to them.
  5. Metrics are the unscaled partial values (a detached clone, taken before megatron edits
     the returned tensor in place): summed over micro-batches and DP ranks they give the batch
     value (`ratio_max`: max).

Log-probs come from the final hidden states, not from full logits: the last stage's output
layer is deferred (`model.deferred_logits`), the loss function picks the positions it needs
(the loss-mask tokens; every token for `LogProbSpec.all_tokens`) and `logprobs.chunked_logprobs`
runs the output layer on `chunk_tokens` of them at a time (recomputing each chunk in the
backward), so no (tokens x vocab) buffer is ever held. Values are scattered back to the
micro-batch's (b, L) rows, so the loss code is the same for packed and padded layouts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from megatron_s2lpo.algo.losses import PolicyLossConfig, policy_loss, truncated_importance_weights

OBJECTIVES = ("policy", "forward_kl", "reverse_kl")  # PPO-clip, distillation warmup, direct OPD loss

from .batching import MicroBatch, PackedRows
from .context_parallel import combine, local_of_global, local_token_index
from .logprobs import chunked_logprobs
from .model import OutputHead, deferred_logits, unwrap_model

Tensor = torch.Tensor
MAX_METRICS = ("ratio_max",)  # combined with max over micro-batches and ranks; the rest add up


@dataclass(kw_only=True, slots=True)
class LossSpec:
    """What one train step's `loss_fn` needs besides the micro-batch."""

    loss_config: PolicyLossConfig
    normalizer: float  # loss_normalizer of the whole batch (all DP ranks)
    num_microbatches: int  # on this rank, as passed to the schedule
    dp_size: int
    vocab_size: int  # real vocabulary; padded logits columns are ignored
    tp_group: dist.ProcessGroup | None
    temperature: float = 1.0
    is_threshold: float | None = None  # truncated IS weights old/behaviour; None = off
    is_sources: tuple[int, ...] | None = None  # source codes whose rows get IS weights; None = all
    objective: str = "policy"  # one of OBJECTIVES
    distill_coef: float = 1.0  # reverse_kl: the loss weight
    chunk_tokens: int = 0  # output-layer rows per log-prob chunk (0: one chunk)
    cp_group: Any = None  # context parallelism: the ranks that share each sequence (None: no CP)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown training objective {self.objective!r}; choose one of {OBJECTIVES}")


@dataclass(kw_only=True, slots=True)
class LogProbSpec:
    """What a no-grad log-prob pass needs."""

    vocab_size: int
    tp_group: dist.ProcessGroup | None
    temperature: float = 1.0
    with_entropy: bool = False
    chunk_tokens: int = 0  # output-layer rows per log-prob chunk (0: one chunk)
    all_tokens: bool = False  # every position of every sequence, not only the loss-mask tokens
    cp_group: Any = None  # context parallelism (see LossSpec)


def _device_of(model: Any) -> torch.device:
    return next(model.parameters()).device


def packed_seq_params(packed: PackedRows, device: torch.device, cp_group: Any = None) -> Any:
    """megatron's THD description of a pack. The padded boundaries serve as the real ones: the
    padding of a sequence sits after it, so causal attention never lets a real token see it.
    With context parallelism they stay the whole pack's (context_parallel.py)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = packed.cu_seqlens.to(device=device, dtype=torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                           cu_seqlens_kv_padded=cu, max_seqlen_q=packed.max_seqlen, max_seqlen_kv=packed.max_seqlen,
                           cp_group=cp_group)


def _cp(group: Any) -> tuple[int, int]:
    """(size, rank) of a context-parallel group; (1, 0) without one."""
    return (dist.get_world_size(group), dist.get_rank(group)) if group is not None else (1, 0)


def _model_forward(model: Any, micro: MicroBatch, cp_group: Any = None) -> Tensor:
    """Last stage (logits deferred): final hidden states (b, s, h); other stages: activations.
    With context parallelism the model gets this CP rank's share of the pack."""
    routing = getattr(unwrap_model(model), "routing_state", None)
    if routing is not None:  # mixture of experts: this micro-batch's routing targets (routing.py)
        routing.before_forward(model, micro)
    device = _device_of(model)
    tokens, position_ids = micro.model_inputs()
    kwargs = {}
    if micro.packed is not None:
        kwargs["packed_seq_params"] = packed_seq_params(micro.packed, device, cp_group)
        cp_size, cp_rank = _cp(cp_group)
        if cp_size > 1:
            local = local_token_index(micro.packed.cu_seqlens, cp_size, cp_rank)
            tokens, position_ids = tokens[:, local], position_ids[:, local]
    return model(tokens.to(device), position_ids.to(device), None, **kwargs)


def _head(model: Any) -> OutputHead | None:
    return OutputHead(model) if getattr(unwrap_model(model), "post_process", False) else None


def selected_positions(micro: MicroBatch, all_tokens: bool = False) -> tuple[Tensor, Tensor]:
    """(rows, cols) of the loss-layout tokens whose log-probs are needed: loss-mask tokens, or
    with `all_tokens` every token after the first of each sequence."""
    cols = torch.arange(micro.seq_len).unsqueeze(0)
    if all_tokens:
        chosen = (cols >= 1) & (cols < micro.seq_lens.unsqueeze(1))
    else:
        chosen = (micro.loss_mask > 0) & (cols >= 1)
    rows, cols = chosen.nonzero(as_tuple=True)
    return rows, cols


def token_values(micro: MicroBatch, hidden: Tensor, head: OutputHead, *, vocab_size: int, tp_group: Any,
                 temperature: float, chunk_tokens: int, with_entropy: bool = False, topk: bool = False,
                 all_tokens: bool = False, cp_group: Any = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Aligned (b, L) log-probs (and entropy, (b, L, K) top-k log-probs) of a micro-batch from
    its final hidden states; 0 at positions that were not selected (`selected_positions`). With
    context parallelism each rank computes the positions whose predicting hidden state it holds
    and the values are made whole over the CP group (context_parallel.combine)."""
    device = hidden.device
    rows, cols = selected_positions(micro, all_tokens)
    index = micro.prediction_index(rows, cols)
    cp_size, cp_rank = _cp(cp_group)
    if cp_size > 1:
        local = local_of_global(micro.packed.cu_seqlens, cp_size, cp_rank)[index]
        keep = local >= 0
        rows, cols, index = rows[keep], cols[keep], local[keep]
    index = index.to(device)
    topk_ids = micro.teacher_topk_ids[rows, cols].to(device) if topk else None
    logprob, entropy, at = chunked_logprobs(
        hidden.reshape(-1, hidden.shape[-1]), index, micro.tokens[rows, cols].to(device), head,
        vocab_size=vocab_size, tp_group=tp_group, temperature=temperature, with_entropy=with_entropy,
        topk_ids=topk_ids, chunk_tokens=chunk_tokens, recompute=0 < chunk_tokens < index.numel())
    rows, cols = rows.to(device), cols.to(device)

    def scatter(values: Tensor | None, *trailing: int) -> Tensor | None:
        if values is None:
            return None
        out = torch.zeros((micro.num_seqs, micro.seq_len, *trailing), dtype=values.dtype, device=device)
        return out.index_put((rows, cols), values)

    out = scatter(logprob), scatter(entropy), scatter(at, *(() if at is None else at.shape[1:]))
    return tuple(combine(values, cp_group) for values in out)


def policy_loss_fn(micro: MicroBatch, spec: LossSpec, head: OutputHead, hidden: Tensor
                   ) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss of one micro-batch, scaled for megatron (module docstring, point 3)."""
    if spec.objective != "policy":
        return _distill_loss_fn(micro, spec, head, hidden)
    cfg = spec.loss_config
    device = hidden.device
    logprobs, entropy, _ = token_values(micro, hidden, head, vocab_size=spec.vocab_size, tp_group=spec.tp_group,
                                        temperature=spec.temperature, chunk_tokens=spec.chunk_tokens,
                                        with_entropy=cfg.entropy_coef > 0, cp_group=spec.cp_group)
    old = micro.old_logprobs.to(device)
    is_weights = None
    if spec.is_threshold is not None:
        is_weights = truncated_importance_weights(old, micro.behaviour_logprobs.to(device), spec.is_threshold)
        if spec.is_sources is not None:  # other rows keep weight 1
            weighted = torch.isin(micro.sources, torch.tensor(spec.is_sources)).to(device).unsqueeze(1)
            is_weights = torch.where(weighted, is_weights, torch.ones_like(is_weights))
    loss, metrics = policy_loss(
        logprobs, old, micro.advantages.to(device), micro.loss_mask.to(device),
        config=cfg, normalizer=spec.normalizer,
        ref_logprobs=None if micro.ref_logprobs is None else micro.ref_logprobs.to(device),
        entropy=entropy, is_weights=is_weights)
    metrics = {"loss": loss.detach().clone(), **metrics}
    return loss * float(spec.num_microbatches * spec.dp_size), metrics


def _distill_loss_fn(micro: MicroBatch, spec: LossSpec, head: OutputHead, hidden: Tensor
                     ) -> tuple[Tensor, dict[str, Tensor]]:
    """forward_kl (teacher completions, optionally the teacher's top-k) or the direct reverse KL."""
    from megatron_s2lpo.algo.distill import forward_kl_loss, reverse_kl_loss

    device = hidden.device
    agg = spec.loss_config.loss_agg_mode
    topk = spec.objective == "forward_kl" and micro.teacher_topk_ids is not None
    logprobs, _, student_topk = token_values(micro, hidden, head, vocab_size=spec.vocab_size, tp_group=spec.tp_group,
                                             temperature=spec.temperature, chunk_tokens=spec.chunk_tokens, topk=topk,
                                             cp_group=spec.cp_group)
    mask = micro.loss_mask.to(device)
    if spec.objective == "forward_kl":
        teacher_topk = micro.teacher_topk_logprobs.to(device) if topk else None
        loss, metrics = forward_kl_loss(logprobs, mask, normalizer=spec.normalizer, loss_agg_mode=agg,
                                        student_topk_logprobs=student_topk, teacher_topk_logprobs=teacher_topk)
    else:
        if micro.teacher_logprobs is None:
            raise ValueError("the reverse_kl objective needs teacher log-probs in the batch (TrainBatch.teacher_logprobs)")
        loss, metrics = reverse_kl_loss(logprobs, micro.teacher_logprobs.to(device), mask, normalizer=spec.normalizer,
                                        loss_agg_mode=agg, coef=spec.distill_coef)
    metrics = {"loss": loss.detach().clone(), **metrics}
    return loss * float(spec.num_microbatches * spec.dp_size), metrics


def train_forward_step(data_iterator: Iterator[MicroBatch], model: Any, *, spec: LossSpec):
    """forward_step for training: (output, partial(policy_loss_fn, micro, spec, head))."""
    micro = next(data_iterator)
    return _model_forward(model, micro, spec.cp_group), partial(policy_loss_fn, micro, spec, _head(model))


def logprob_loss_fn(micro: MicroBatch, spec: LogProbSpec, head: OutputHead, hidden: Tensor
                    ) -> tuple[Tensor, dict[str, Tensor]]:
    """No-grad pass: a zero 'loss' and the micro-batch's aligned log-probs (and entropy)."""
    logprobs, entropy, _ = token_values(micro, hidden, head, vocab_size=spec.vocab_size, tp_group=spec.tp_group,
                                        temperature=spec.temperature, chunk_tokens=spec.chunk_tokens,
                                        with_entropy=spec.with_entropy, all_tokens=spec.all_tokens,
                                        cp_group=spec.cp_group)
    out = {"indices": micro.indices, "logprobs": logprobs.float().cpu()}
    if entropy is not None:
        out["entropy"] = entropy.float().cpu()
    return hidden.new_zeros(()), out


def logprob_forward_step(data_iterator: Iterator[MicroBatch], model: Any, *, spec: LogProbSpec):
    """forward_step for log-prob passes (old / reference log-probs)."""
    micro = next(data_iterator)
    return _model_forward(model, micro, spec.cp_group), partial(logprob_loss_fn, micro, spec, _head(model))


def run_schedule(
    forward_step_func: Any,
    model_chunks: list[Any],
    micro_batches: list[MicroBatch],
    *,
    forward_only: bool,
) -> list[dict[str, Tensor]]:
    """Run megatron's forward-backward schedule over `micro_batches`; returns the loss_fn dicts.

    The dicts come back on the last pipeline stage only (an empty list elsewhere). Every chunk
    of an interleaved pipeline reads the micro-batches through its own iterator.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    data = [iter(micro_batches) for _ in model_chunks]
    forward_backward = get_forward_backward_func()
    with deferred_logits(model_chunks):
        stored = forward_backward(
            forward_step_func=forward_step_func,
            data_iterator=data if len(model_chunks) > 1 else data[0],
            model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
            num_microbatches=len(micro_batches),
            seq_length=max(m.input_shape[1] for m in micro_batches),
            micro_batch_size=max(m.input_shape[0] for m in micro_batches),
            forward_only=forward_only,
        )
    return list(stored) if stored else []


def reduce_metrics(
    stored: list[dict[str, Tensor]],
    *,
    dp_group: dist.ProcessGroup,
    pp_group: dist.ProcessGroup,
    is_last_stage: bool,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Combine per-micro-batch metric dicts over micro-batches, DP ranks and pipeline stages.

    Sums (max for MAX_METRICS) over this rank's micro-batches, then over the DP group; the last
    pipeline stage's result is broadcast to the other stages so every rank returns the same dict.
    """
    local: dict[str, float] = {}
    for record in stored:
        for key, value in record.items():
            value = float(value)
            if key in MAX_METRICS:
                local[key] = max(local.get(key, float("-inf")), value)
            else:
                local[key] = local.get(key, 0.0) + value
    keys = sorted(local)
    if is_last_stage and dist.get_world_size(group=dp_group) > 1:
        as_tensor = partial(torch.tensor, dtype=torch.float64, device=device)
        sums = as_tensor([0.0 if k in MAX_METRICS else local[k] for k in keys])
        maxes = as_tensor([local[k] if k in MAX_METRICS else 0.0 for k in keys])
        dist.all_reduce(sums, group=dp_group)
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=dp_group)
        local = {k: float(maxes[i] if k in MAX_METRICS else sums[i]) for i, k in enumerate(keys)}
    if dist.get_world_size(group=pp_group) > 1:
        holder = [local if is_last_stage else None]
        last = dist.get_global_rank(pp_group, dist.get_world_size(group=pp_group) - 1)
        dist.broadcast_object_list(holder, src=last, group=pp_group)
        local = holder[0]
    return local
