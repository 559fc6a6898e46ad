"""Context parallelism (CP) of packed sequences: which tokens a CP rank holds, attention over the
whole sequence on the local spec, and per-token values made whole again.

Split (megatron's and Transformer Engine's THD layout, `get_batch_on_this_cp_rank` /
`thd_get_partitioned_indices`): every sequence of a pack, padded to a multiple of 2 x CP
(config.learner.token_alignment), is cut into 2 x CP equal chunks; CP rank r holds chunks r and
2 x CP - 1 - r of every sequence, in that order, so causal attention costs every rank the same.
The model gets this rank's tokens and the pack's GLOBAL (padded) cu_seqlens; megatron's THD RoPE
(`_apply_rotary_pos_emb_thd` with the CP group) gives each local token its global position.

Attention on the local spec (`attention`): keys and values of the whole pack are all-gathered over
the CP group (the backward sums their gradients back to the ranks that hold them), put back into
sequence order, and every local query attends causally to the keys of its own sequence at global
positions up to its own. The TE spec does this inside Transformer Engine's attention (GPU).

Per-token values (`combine`): each rank computes log-probs (entropy, top-k) for the positions
whose predicting hidden state it holds, zeros elsewhere; a SUM all-reduce over the CP group makes
the (b, L) tensors whole on every rank, with the gradient of each entry flowing only into the
rank that computed it. Every CP rank then computes the same full loss, so the loss code is the
one of CP = 1, and the gradients of the ranks add up to the full gradient (megatron multiplies
the loss by CP in its schedule and averages gradients over DP x CP: step.py's factor is unchanged).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

Tensor = torch.Tensor


def local_token_index(cu_seqlens: Tensor, cp_size: int, cp_rank: int) -> Tensor:
    """(T / cp_size,) global pack positions of CP rank `cp_rank`'s tokens, in its order."""
    cu = cu_seqlens.long().tolist()
    pieces = []
    for start, end in zip(cu[:-1], cu[1:]):
        length = end - start
        if length % (2 * cp_size):
            raise ValueError(f"a packed sequence of {length} tokens cannot be split into 2 x CP = {2 * cp_size} "
                             "chunks; the learner pads sequences to a multiple of 2 x learner.context_parallel_size")
        chunk = length // (2 * cp_size)
        for part in (cp_rank, 2 * cp_size - 1 - cp_rank):
            pieces.append(torch.arange(start + part * chunk, start + (part + 1) * chunk))
    return torch.cat(pieces)


def local_of_global(cu_seqlens: Tensor, cp_size: int, cp_rank: int) -> Tensor:
    """(T,) this rank's local position of every global pack position, -1 where another rank holds it."""
    index = local_token_index(cu_seqlens, cp_size, cp_rank)
    out = torch.full((int(cu_seqlens[-1]),), -1, dtype=torch.long)
    out[index] = torch.arange(index.numel())
    return out


class _AllGather(torch.autograd.Function):
    """All-gather along dim 0 over `group`; the backward sums every rank's gradient and keeps this
    rank's slice (an all-reduce: gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:
        ctx.group, ctx.rank, ctx.rows = group, dist.get_rank(group), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None


def attention(query: Tensor, key: Tensor, value: Tensor, cu_seqlens: Tensor, group: Any, *, scale: float) -> Tensor:
    """Causal attention of this rank's THD queries over the whole pack (module docstring).

    query (T / CP, Hq, D), key / value (T / CP, Hkv, D) in this rank's token order; cu_seqlens the
    global padded boundaries. Returns (T / CP, Hq, D)."""
    cp_size, cp_rank = dist.get_world_size(group), dist.get_rank(group)
    order = torch.cat([local_token_index(cu_seqlens, cp_size, r) for r in range(cp_size)]).to(key.device)
    keys, values = _AllGather.apply(key, group), _AllGather.apply(value, group)  # (T, Hkv, D) in rank order
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    keys, values = keys[inverse], values[inverse]  # global order
    mine = local_token_index(cu_seqlens, cp_size, cp_rank).to(query.device)
    cu = cu_seqlens.long().tolist()
    gqa = query.shape[1] != key.shape[1]
    out, offset = [], 0
    for start, end in zip(cu[:-1], cu[1:]):
        count = (end - start) // cp_size
        positions = mine[offset:offset + count] - start  # (count,) within the sequence
        q = query[offset:offset + count]
        mask = torch.arange(end - start, device=q.device).unsqueeze(0) <= positions.unsqueeze(1)  # (count, L)
        o = F.scaled_dot_product_attention(q.transpose(0, 1), keys[start:end].transpose(0, 1),
                                           values[start:end].transpose(0, 1), attn_mask=mask, scale=scale,
                                           enable_gqa=gqa)
        out.append(o.transpose(0, 1))
        offset += count
    return torch.cat(out)


def combine(values: Tensor | None, group: Any) -> Tensor | None:
    """This rank's per-token values (zeros where other ranks compute them) made whole on every
    CP rank; gradients reach only the entries this rank computed."""
    if values is None or group is None or dist.get_world_size(group) == 1:
        return values
    total = values.detach().clone()
    dist.all_reduce(total, group=group)
    return values + (total - values.detach())
