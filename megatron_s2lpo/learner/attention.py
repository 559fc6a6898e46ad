"""Attention core of the local layer spec that honours packed (THD) sequences.

megatron-core's local `DotProductAttention` refuses `packed_seq_params` (only TE's attention
takes them). `PackedDotProductAttention` is that class with one addition: given THD input
(query (T, heads, head_dim), key / value (T, groups, head_dim) and `cu_seqlens`), every token
attends causally within its own sequence only. Right-padded input (no packing) runs
megatron's own code unchanged.

Kernels, in order of preference (`packed_attention`):
  varlen   torch.nn.attention.varlen.varlen_attn (FlashAttention, CUDA, bf16 / fp16): one call,
           cost sum(L_i^2), no mask tensor;
  grouped  the pack's sequences sorted by length into groups whose padded square
           (n x L_max^2) costs at most GROUP_WASTE x their sum(L_i^2); one batched
           scaled_dot_product_attention(is_causal=True) per group on the sequences laid out as
           padded rows (padding follows each sequence, so causal attention never reads it):
           a few calls per pack, each wide enough for the CPU's threads (the default off CUDA);
  masked   scaled_dot_product_attention over the whole pack with a block-diagonal causal
           mask: one call, cost T^2;
  split    scaled_dot_product_attention(is_causal=True) per sequence: cost sum(L_i^2) plus a
           call per sequence (one thread's worth of work per call on a CPU).
All compute the same softmax(q k^T * scale) v; GQA groups are expanded by the kernel
(`enable_gqa`), as megatron's `repeat_interleave` does.
With context parallelism (the pack's PackedSeqParams carries a CP group of more than one rank)
the local queries attend to the whole pack's keys, all-gathered over the group
(context_parallel.attention).
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
from typing import Any

import torch
import torch.nn.functional as F

from . import context_parallel

Tensor = torch.Tensor


def _varlen_kernel() -> Any | None:
    """torch's FlashAttention varlen entry point, when this torch has it (2.10+)."""
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return None
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


GROUP_WASTE = 1.5  # a group's padded square may cost this much more than its sequences' squares


def attention_kernel(query: Tensor, seq_lens: list[int]) -> str:
    """Which kernel `packed_attention` uses for THD `query` with these (padded) sequence lengths."""
    if query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and _varlen_kernel() is not None:
        return "varlen"
    return "grouped"


def length_groups(seq_lens: list[int], waste: float = GROUP_WASTE) -> list[list[int]]:
    """Sequence positions grouped longest first: a group grows while n x L_max^2 stays within
    `waste` x sum(L_i^2) of its members (L_max: its first, longest).

    >>> length_groups([300, 290, 12, 11, 10, 9, 280])
    [[0, 1, 6, 2], [3, 4, 5]]
    """
    order = sorted(range(len(seq_lens)), key=lambda i: (-seq_lens[i], i))
    groups: list[list[int]] = []
    exact = 0
    for i in order:
        n = seq_lens[i]
        if groups and (len(groups[-1]) + 1) * seq_lens[groups[-1][0]] ** 2 <= waste * (exact + n * n):
            groups[-1].append(i)
            exact += n * n
        else:
            groups.append([i])
            exact = n * n
    return groups


def _grouped_attention(query: Tensor, key: Tensor, value: Tensor, seq_lens: list[int], *, scale: float,
                       gqa: bool) -> Tensor:
    """One batched causal SDPA per `length_groups` group (module docstring)."""
    starts = [0, *itertools.accumulate(seq_lens)][:-1]
    pieces, positions = [], []
    for group in length_groups(seq_lens):
        longest = seq_lens[group[0]]
        offsets = torch.arange(longest, device=query.device)
        start = torch.tensor([starts[i] for i in group], device=query.device).unsqueeze(1)
        length = torch.tensor([seq_lens[i] for i in group], device=query.device).unsqueeze(1)
        valid = offsets.unsqueeze(0) < length  # (n, L_max)
        index = torch.where(valid, start + offsets, start)  # padding rows read the sequence's first token
        rows = [t[index].permute(0, 2, 1, 3) for t in (query, key, value)]  # (n, heads, L_max, D)
        out = F.scaled_dot_product_attention(*rows, is_causal=True, scale=scale, enable_gqa=gqa)
        pieces.append(out.permute(0, 2, 1, 3)[valid])  # (tokens of the group, heads, D)
        positions.append(index[valid])
    order = torch.cat(positions).argsort()
    return torch.cat(pieces)[order]


def block_causal_mask(seq_lens: list[int], device: torch.device | None = None) -> Tensor:
    """(T, T) bool, True where query i may attend key j: same sequence and j <= i."""
    segment = torch.repeat_interleave(torch.arange(len(seq_lens), device=device),
                                      torch.tensor(seq_lens, device=device))
    causal = torch.ones(segment.numel(), segment.numel(), dtype=torch.bool, device=device).tril()
    return causal & (segment.unsqueeze(0) == segment.unsqueeze(1))


def packed_attention(query: Tensor, key: Tensor, value: Tensor, cu_seqlens: Tensor, max_seqlen: int, *,
                     scale: float, kernel: str | None = None) -> Tensor:
    """Causal attention within each packed sequence.

    query (T, Hq, D), key / value (T, Hkv, D) with Hq a multiple of Hkv, cu_seqlens (n + 1,)
    int boundaries (cu_seqlens[-1] == T). Returns (T, Hq, D). kernel: force "varlen" / "grouped"
    / "masked" / "split" (tests, benchmarks); None picks as `attention_kernel` does.
    """
    seq_lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    if sum(seq_lens) != query.shape[0]:
        raise ValueError(f"cu_seqlens cover {sum(seq_lens)} tokens but the packed query has {query.shape[0]}")
    kernel = kernel or attention_kernel(query, seq_lens)
    gqa = query.shape[1] != key.shape[1]
    if kernel == "varlen":
        cu = cu_seqlens.to(device=query.device, dtype=torch.int32)
        return _varlen_kernel()(query, key, value, cu, cu, max_seqlen, max_seqlen, scale=scale,
                                window_size=(-1, 0), enable_gqa=gqa)
    if kernel == "masked":
        mask = block_causal_mask(seq_lens, query.device)
        out = F.scaled_dot_product_attention(query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1),
                                             attn_mask=mask, scale=scale, enable_gqa=gqa)  # (Hq, T, D)
        return out.transpose(0, 1)
    if kernel == "grouped":
        return _grouped_attention(query, key, value, seq_lens, scale=scale, gqa=gqa)
    if kernel != "split":
        raise ValueError(f"unknown attention kernel {kernel!r}; choose varlen, grouped, masked or split")
    pieces = [F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                             is_causal=True, scale=scale, enable_gqa=gqa).transpose(0, 1)
              for q, k, v in zip(query.split(seq_lens), key.split(seq_lens), value.split(seq_lens))]
    return torch.cat(pieces)


def packed_core_attention_class() -> type:
    """megatron's DotProductAttention extended to THD input (imports megatron on first call)."""
    global _PACKED_CLASS
    if _PACKED_CLASS is None:
        from megatron.core.transformer.dot_product_attention import DotProductAttention

        class PackedDotProductAttention(DotProductAttention):
            """DotProductAttention that also takes packed sequences (module docstring)."""

            def __init__(self, config, *args, **kwargs):
                # megatron's local core asserts context_parallel_size == 1; packed input takes the
                # context-parallel path below (context_parallel.attention), built with a CP-1 view
                local = copy.copy(config)
                local.context_parallel_size = 1
                super().__init__(local, *args, **kwargs)
                self.config = config

            def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                        packed_seq_params=None):
                if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
                    if self.config.context_parallel_size > 1:
                        raise ValueError("context parallelism needs packed sequences (learner.pack_sequences=true)")
                    return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                           attention_bias=attention_bias, packed_seq_params=None)
                if attention_bias is not None:
                    raise ValueError("attention_bias is not supported with packed sequences")
                # megatron folds apply_query_key_layer_scaling into the softmax; undo it here
                scale = self.softmax_scale * (self.layer_number if self.config.apply_query_key_layer_scaling else 1)
                cu_seqlens = packed_seq_params.cu_seqlens_q_padded
                if cu_seqlens is None:
                    cu_seqlens = packed_seq_params.cu_seqlens_q
                group = packed_seq_params.cp_group
                if group is not None and group.size() > 1:
                    out = context_parallel.attention(query, key, value, cu_seqlens, group, scale=scale)
                else:
                    out = packed_attention(query, key, value, cu_seqlens, packed_seq_params.max_seqlen_q, scale=scale)
                return out.reshape(out.shape[0], self.hidden_size_per_partition)  # (T, heads * head_dim)

        _PACKED_CLASS = PackedDotProductAttention
    return _PACKED_CLASS


_PACKED_CLASS: type | None = None
