"""Log-probs and entropy of sampled tokens from vocab-parallel logits, never gathering the vocab.

With tensor parallelism each TP rank holds the logits of a contiguous slice of the (padded)
vocabulary: rank r has columns [r * V_local, (r + 1) * V_local). The softmax statistics are
reduced over the TP group instead of gathering the (B, T, V) logits on one rank:

    m      = all_reduce_max(max_j z_j)                              # (B, T)
    S      = all_reduce_sum(sum_j exp(z_j - m))                     # (B, T)
    z_tgt  = all_reduce_sum(z_target - m on the rank owning it)     # (B, T)
    log p(target) = z_tgt - log S
    H      = log S - all_reduce_sum(sum_j p_j (z_j - m))            # entropy
with z = logits / temperature (the rollout engine samples from softmax(logits / temperature), so
the ratio must use the same distribution). Columns past `vocab_size` (TP padding of the
embedding) are dropped before any of this: they never carry probability.

The backward is local to each rank (each rank's logits columns get their own gradient), like
megatron's `vocab_parallel_cross_entropy`:
    d log p(target) / dz_j = 1[j = target] - p_j
    d H / dz_j             = -p_j (log p_j + H)

`vocab_parallel_logprobs_at` / `token_topk_logprobs` do the same for K given ids per position
(the teacher's top-k ids of distillation), with the gradient of every one of them.

This module imports only torch; `tp_group=None` means no tensor parallelism.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

Tensor = torch.Tensor


def _all_reduce(tensor: Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> None:
    if group is not None and dist.get_world_size(group=group) > 1:
        dist.all_reduce(tensor, op=op, group=group)


class _VocabParallelLogProb(torch.autograd.Function):
    """(logits slice, targets) -> (log p(target), entropy) reduced over the TP group."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, vocab_start: int, num_real: int,
                temperature: float, with_entropy: bool, group: dist.ProcessGroup | None):
        # logits: (..., V_local) this rank's columns; target: (...) global vocab ids.
        z = logits[..., :num_real].float().div(temperature)  # a new tensor: safe to edit in place
        if num_real > 0:
            z_max = z.max(dim=-1).values
        else:  # every column of this rank is padding
            z_max = torch.full(z.shape[:-1], float("-inf"), dtype=z.dtype, device=z.device)
        _all_reduce(z_max, dist.ReduceOp.MAX, group)
        z.sub_(z_max.unsqueeze(-1))  # shifted: exp never overflows
        exp_z = z.exp()
        local = target - vocab_start
        owned = (local >= 0) & (local < num_real)
        index = local.clamp(0, max(num_real - 1, 0)).unsqueeze(-1)
        z_target = z.gather(-1, index).squeeze(-1) if num_real > 0 else torch.zeros_like(z_max)
        stats = [exp_z.sum(dim=-1), torch.where(owned, z_target, torch.zeros_like(z_target))]
        if with_entropy:
            stats.append((exp_z * z).sum(dim=-1))
        stats_t = torch.stack(stats)  # one all-reduce for all sums
        _all_reduce(stats_t, dist.ReduceOp.SUM, group)
        log_sum = stats_t[0].log()
        logprob = stats_t[1] - log_sum
        entropy = log_sum - stats_t[2] / stats_t[0] if with_entropy else None
        ctx.save_for_backward(z, log_sum, index, owned, entropy if with_entropy else log_sum)
        ctx.meta = (logits.shape, logits.dtype, num_real, temperature, with_entropy)
        return (logprob, entropy) if with_entropy else (logprob, torch.zeros_like(logprob))

    @staticmethod
    def backward(ctx, grad_logprob: Tensor, grad_entropy: Tensor):
        z, log_sum, index, owned, entropy = ctx.saved_tensors
        shape, dtype, num_real, temperature, with_entropy = ctx.meta
        log_p = z.sub_(log_sum.unsqueeze(-1))  # (..., V_real) log-softmax, reusing z's memory
        p = log_p.exp()
        grad_z = p * (-grad_logprob.unsqueeze(-1))
        if num_real > 0:
            grad_z.scatter_add_(-1, index, (grad_logprob * owned).unsqueeze(-1).to(grad_z.dtype))
        if with_entropy and grad_entropy is not None:
            grad_z.sub_(p * (log_p + entropy.unsqueeze(-1)) * grad_entropy.unsqueeze(-1))
        grad_z.div_(temperature)
        grad_logits = torch.zeros(shape, dtype=dtype, device=grad_z.device)
        grad_logits[..., :num_real] = grad_z.to(dtype)
        return grad_logits, None, None, None, None, None, None


def _vocab_slice(local_vocab: int, vocab_size: int, tp_group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(first global id of this rank's logits columns, how many of them are real, not padding)."""
    tp_rank = dist.get_rank(group=tp_group) if tp_group is not None else 0
    vocab_start = tp_rank * local_vocab
    return vocab_start, max(0, min(local_vocab, vocab_size - vocab_start))


def vocab_parallel_logprobs(
    logits: Tensor,
    target: Tensor,
    *,
    vocab_size: int,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Position-wise log p(target) and entropy from this rank's vocab slice of the logits.

    logits: (..., V_local) columns [tp_rank * V_local, (tp_rank + 1) * V_local) of the padded
    vocabulary; target: (...) long, global token ids (< vocab_size); vocab_size: the real
    vocabulary (columns >= vocab_size are padding and ignored). Returns ((...), (...) or None).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (the rollout sampling temperature), got {temperature}")
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} disagree: "
                         "target must have the logits' shape without the vocab dimension")
    vocab_start, num_real = _vocab_slice(logits.shape[-1], vocab_size, tp_group)
    logprob, entropy = _VocabParallelLogProb.apply(
        logits, target, vocab_start, num_real, float(temperature), with_entropy, tp_group)
    return logprob, (entropy if with_entropy else None)


def token_logprobs(
    logits: Tensor,
    tokens: Tensor,
    *,
    vocab_size: int,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs (and entropies) aligned with `tokens`, the project's convention (types.py).

    logits: (B, T, V_local) vocab-parallel model output for `tokens` (B, T). Entry [b, t] of
    the result is log p(tokens[b, t] | tokens[b, :t]) (from the logits at position t - 1) and
    the entropy of that same distribution; entry [b, 0] is 0 (no prediction for the first
    token). Returns ((B, T) float32, (B, T) float32 or None).
    """
    if logits.dim() != 3 or tokens.dim() != 2 or logits.shape[:2] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} must be (B, T, V_local) for tokens (B, T) "
                         f"{tuple(tokens.shape)}")
    # Position t predicts token t + 1; the last position's target is a dummy (dropped below).
    next_tokens = torch.roll(tokens, shifts=-1, dims=1)
    logprob, entropy = vocab_parallel_logprobs(
        logits, next_tokens, vocab_size=vocab_size, tp_group=tp_group,
        temperature=temperature, with_entropy=with_entropy)

    def align(values: Tensor) -> Tensor:  # (B, T) predictions -> (B, T) aligned with tokens
        return torch.cat([values.new_zeros(values.shape[0], 1), values[:, :-1]], dim=1)

    return align(logprob), (align(entropy) if entropy is not None else None)


# ----------------------------------------------------------------------------- top-k targets


class _VocabParallelLogProbAt(torch.autograd.Function):
    """(logits slice, ids (..., K)) -> log p(ids) (..., K) reduced over the TP group."""

    @staticmethod
    def forward(ctx, logits: Tensor, ids: Tensor, vocab_start: int, num_real: int, temperature: float,
                group: dist.ProcessGroup | None):
        dtype = torch.promote_types(logits.dtype, torch.float32)  # bf16 -> fp32 math, fp64 stays fp64
        z = logits[..., :num_real].to(dtype).div(temperature)  # a new tensor: safe to edit in place
        if num_real > 0:
            z_max = z.max(dim=-1).values
        else:  # every column of this rank is padding
            z_max = torch.full(z.shape[:-1], float("-inf"), dtype=dtype, device=z.device)
        _all_reduce(z_max, dist.ReduceOp.MAX, group)
        z.sub_(z_max.unsqueeze(-1))
        local = ids - vocab_start
        owned = (local >= 0) & (local < num_real)  # (..., K)
        index = local.clamp(0, max(num_real - 1, 0))
        z_ids = z.gather(-1, index) if num_real > 0 else torch.zeros(ids.shape, dtype=dtype, device=z.device)
        stats = torch.cat([z.exp().sum(dim=-1, keepdim=True), torch.where(owned, z_ids, torch.zeros_like(z_ids))],
                          dim=-1)  # (..., 1 + K): one all-reduce for the sum-exp and the K target logits
        _all_reduce(stats, dist.ReduceOp.SUM, group)
        log_sum = stats[..., :1].log()  # (..., 1)
        ctx.save_for_backward(z, log_sum, index, owned)
        ctx.meta = (logits.shape, logits.dtype, num_real, temperature)
        return stats[..., 1:] - log_sum

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, log_sum, index, owned = ctx.saved_tensors
        shape, dtype, num_real, temperature = ctx.meta
        p = z.sub_(log_sum).exp_()  # (..., V_real) softmax, reusing z's memory
        # d sum_k g_k log p(id_k) / dz_j = sum_{k: id_k = j} g_k - p_j sum_k g_k
        grad_z = p.mul_(-grad.sum(dim=-1, keepdim=True).to(p.dtype))
        if num_real > 0:
            grad_z.scatter_add_(-1, index, (grad * owned).to(grad_z.dtype))
        grad_z.div_(temperature)
        grad_logits = torch.zeros(shape, dtype=dtype, device=grad_z.device)
        grad_logits[..., :num_real] = grad_z.to(dtype)
        return grad_logits, None, None, None, None, None


def vocab_parallel_logprobs_at(
    logits: Tensor,
    ids: Tensor,
    *,
    vocab_size: int,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """log p(id) for K given ids per position, from this rank's vocab slice of the logits.

    logits: (..., V_local) columns [tp_rank * V_local, (tp_rank + 1) * V_local) of the padded
    vocabulary; ids: (..., K) long, global ids (e.g. the teacher's top-k); vocab_size: the real
    vocabulary (columns >= vocab_size are padding and ignored). Returns (..., K) log-probs under
    softmax(logits / temperature) over the full real vocabulary, float32 (float64 for float64
    logits), differentiable w.r.t. logits. Ids outside [0, vocab_size) (fillers of masked
    positions) get a finite meaningless value and no gradient of their own: mask them in the loss.

    Same reductions as `vocab_parallel_logprobs` (max, then sum-exp and the K shifted target
    logits in one all-reduce); nothing of size V is communicated. The backward treats those
    all-reduces as the identity on each rank, i.e. every rank back-propagates into its own
    columns only: d sum_k g_k log p(id_k) / dz_j = sum_{k: id_k = j} g_k - p_j sum_k g_k. That
    is the exact gradient because every TP rank computes the SAME loss from the same reduced
    values: the upstream gradient g is replicated, and a reduced sum S = sum_r s_r has
    dS/ds_r = 1 for each rank's own share s_r. An all-reduce in the backward would instead
    count the replicated loss tp_size times. (The max is a constant shift: log-softmax does not
    depend on it, so it needs no gradient.)
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (the rollout sampling temperature), got {temperature}")
    if ids.dim() != logits.dim() or logits.shape[:-1] != ids.shape[:-1]:
        raise ValueError(f"logits {tuple(logits.shape)} and ids {tuple(ids.shape)} disagree: ids must have "
                         "the logits' shape with the vocab dimension replaced by K")
    if ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"ids must be an integer tensor of vocabulary ids, got {ids.dtype}")
    vocab_start, num_real = _vocab_slice(logits.shape[-1], vocab_size, tp_group)
    return _VocabParallelLogProbAt.apply(logits, ids.long(), vocab_start, num_real, float(temperature), tp_group)


def token_topk_logprobs(
    logits: Tensor,
    topk_ids: Tensor,
    *,
    vocab_size: int,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """Student log-probs at given ids (e.g. the teacher's top-k), aligned like `token_logprobs`.

    logits: (B, T, V_local) vocab-parallel model output for the tokens; topk_ids: (B, T, K),
    entry [b, t] holds the ids of the distribution that predicts token t, i.e. the one from the
    logits at position t - 1 (the convention of `TrainBatch.teacher_topk_ids`). Entry [b, t, k]
    of the result is log p(topk_ids[b, t, k] | tokens[b, :t]); entry [b, 0] is 0 (no
    prediction for the first token). Returns (B, T, K), float32 (float64 for float64 logits).
    """
    if logits.dim() != 3 or topk_ids.dim() != 3 or logits.shape[:2] != topk_ids.shape[:2]:
        raise ValueError(f"logits {tuple(logits.shape)} must be (B, T, V_local) for topk_ids (B, T, K) "
                         f"{tuple(topk_ids.shape)}")
    # Position t predicts token t + 1, so it takes the ids stored at t + 1; the last position's
    # ids are a dummy (dropped below).
    next_ids = torch.roll(topk_ids, shifts=-1, dims=1)
    logprob = vocab_parallel_logprobs_at(logits, next_ids, vocab_size=vocab_size, tp_group=tp_group,
                                         temperature=temperature)  # (B, T, K)
    return torch.cat([logprob.new_zeros(logprob.shape[0], 1, logprob.shape[2]), logprob[:, :-1]], dim=1)


# ----------------------------------------------------------------------------- truncated sampling

# A logit low enough that exp() underflows to 0 at any temperature >= 1e-8 yet finite, so that
# 0 * logit stays 0 in the entropy (-inf would give nan).
_DROPPED = -1e30


@torch.no_grad()
def kept_support(logits: Tensor, targets: Tensor, *, vocab_size: int, tp_group: dist.ProcessGroup | None,
                 temperature: float, top_k: int, top_p: float) -> tuple[Tensor, Tensor]:
    """(this rank's columns the engine's top-k then top-p keep, log of the kept mass).

    logits: (n, V_local) vocab-parallel; targets: (n,) global ids. The kept set is SGLang's torch
    sampler's (rollout.local.support_mask: sorted descending, rank < top_k, mass before the token
    <= top_p, computed on softmax(logits / temperature) over the real vocabulary), with the target
    always in it: a sampled token outside the learner's own kept set (the engine's numerics
    differ) is renormalised with the set instead of getting -inf. The sort needs whole rows, so
    under TP the chunk's logits are all-gathered (n x V floats: keep learner.logprob_chunk_tokens
    small). Returns ((n, V_local) bool, (n,) float32 log sum of kept probabilities)."""
    from megatron_s2lpo.rollout.local import support_mask

    vocab_start, num_real = _vocab_slice(logits.shape[-1], vocab_size, tp_group)
    z = logits.float().div(temperature)
    if tp_group is not None and dist.get_world_size(group=tp_group) > 1:
        parts = [torch.empty_like(z) for _ in range(dist.get_world_size(group=tp_group))]
        dist.all_gather(parts, z.contiguous(), group=tp_group)
        z = torch.cat(parts, dim=-1)
    probs = torch.softmax(z[:, :vocab_size], dim=-1)  # (n, V)
    n = probs.shape[0]
    k = torch.full((n,), vocab_size if top_k < 1 else min(top_k, vocab_size), device=probs.device)
    keep = support_mask(probs, k, torch.full((n,), float(top_p), device=probs.device))
    keep.scatter_(-1, targets.long().unsqueeze(-1), True)
    log_mass = torch.where(keep, probs, torch.zeros_like(probs)).sum(dim=-1).log()
    local = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    local[:, :num_real] = keep[:, vocab_start:vocab_start + num_real]
    return local, log_mass


# ----------------------------------------------------------------------------- chunked, selected positions


def chunked_logprobs(
    hidden: Tensor,
    index: Tensor,
    targets: Tensor,
    logits_fn,
    *,
    vocab_size: int,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    topk_ids: Tensor | None = None,
    chunk_tokens: int = 0,
    recompute: bool = False,
    truncation: tuple[int, float] | None = None,
    kept_mass: list[Tensor] | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Log-probs of `targets` from the logits of the hidden states at `index`, a chunk at a time.

    hidden: (N_all, h) flattened model outputs before the output layer; index: (N,) long, the
    rows of `hidden` whose logits predict each target; targets: (N,) global ids; logits_fn:
    (n, h) -> (n, V_local) vocab-parallel logits (the output layer); topk_ids: (N, K) ids to
    also score (the teacher's top-k). Only `chunk_tokens` rows of logits exist at a time (0: all
    N at once). recompute: keep nothing of a chunk for the backward but its (n, h) input and
    recompute its logits there (torch.utils.checkpoint), so the training pass never holds more
    than one chunk's logits either. Returns ((N,) log-probs, (N,) entropies or None, (N, K) or
    None), float32, differentiable w.r.t. hidden (and the output layer's weight).

    truncation: (top_k, top_p) of the engine's sampler (top_k < 1 or top_p = 1: off): the
    log-probs and entropy are then those of the sampler's truncated distribution, renormalised over
    the kept set (`kept_support`; the gradient flows through the kept logits). kept_mass: a list
    that receives each chunk's (n,) log kept mass (no gradient), in order.
    """
    if index.dim() != 1 or targets.shape != index.shape:
        raise ValueError(f"index {tuple(index.shape)} and targets {tuple(targets.shape)} must be equal 1-D shapes")
    if topk_ids is not None and topk_ids.shape[0] != index.shape[0]:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} must have one row per target ({index.shape[0]})")

    def one_chunk(h: Tensor, tgt: Tensor, ids: Tensor | None):
        logits = logits_fn(h)  # (n, V_local)
        if truncation is not None:
            keep, log_mass = kept_support(logits, tgt, vocab_size=vocab_size, tp_group=tp_group,
                                          temperature=temperature, top_k=truncation[0], top_p=truncation[1])
            if kept_mass is not None:
                kept_mass.append(log_mass)
            logits = logits.masked_fill(~keep, _DROPPED)
        logprob, entropy = vocab_parallel_logprobs(logits, tgt, vocab_size=vocab_size, tp_group=tp_group,
                                                   temperature=temperature, with_entropy=with_entropy)
        at = None if ids is None else vocab_parallel_logprobs_at(logits, ids, vocab_size=vocab_size,
                                                                 tp_group=tp_group, temperature=temperature)
        return logprob, entropy, at

    size = chunk_tokens if chunk_tokens > 0 else max(index.numel(), 1)
    parts: list[tuple] = []
    for start in range(0, index.numel(), size):
        rows = index[start:start + size]
        args = (hidden[rows], targets[start:start + size], None if topk_ids is None else topk_ids[start:start + size])
        if recompute and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            parts.append(checkpoint(one_chunk, *args, use_reentrant=False))
        else:
            parts.append(one_chunk(*args))
    if not parts:  # no selected positions: empty results that still belong to the graph
        empty = hidden.sum() * 0.0
        k = 0 if topk_ids is None else topk_ids.shape[1]
        return (empty.reshape(1).expand(0).float(), empty.reshape(1).expand(0).float() if with_entropy else None,
                None if topk_ids is None else empty.reshape(1, 1).expand(0, k).float())
    logprob = torch.cat([p[0] for p in parts])
    entropy = torch.cat([p[1] for p in parts]) if with_entropy else None
    at = torch.cat([p[2] for p in parts]) if topk_ids is not None else None
    return logprob, entropy, at
