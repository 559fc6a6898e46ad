"""Split a TrainBatch over data-parallel ranks and group each share into token-budget micro-batches.

Two layouts (`learner.pack_sequences`):
  packed (THD)  whole sequences back to back in ONE row of at most `max_tokens` tokens, each
                padded only to `multiple` (first-fit decreasing bin packing, `bin_pack`), the
                pack's total to `pack_multiple` (the last sequence's padding grows); the
                model sees (1, T) tokens with megatron's `PackedSeqParams` (cu_seqlens) so
                attention stays within each sequence and RoPE restarts at every sequence.
  padded        as many whole sequences as fit in `max_tokens` once right-padded to a common
                length (`pack_sequences`): the model sees (b, L).
Both are sorted longest first, which surfaces an out-of-memory on the first micro-batch rather
than the last. Either way a micro-batch also carries its rows in the right-padded (b, L) "loss
layout" (advantages, old / behaviour / ref log-probs, loss mask): the loss code works on rows,
and `prediction_index` maps a (row, column) of that layout to the model output position whose
logits predict it.

Shapes differ between micro-batches. Without PP there is no p2p and any shape is fine; with
PP the 1F1B schedule copes because the learner sets `variable_seq_lengths=True` (each p2p
transfer first sends the activation shape; see model.py). The interleaved (VPP) schedule needs
one shape per step, so there `uniform_micro_batches` pads all micro-batches of the step to the
largest (sequences, length) with rows that carry no loss.

Pure torch (no megatron): unit-tested in tests/unit/test_learner_batching.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from megatron_s2lpo.config.learner import TokenAlignment
from megatron_s2lpo.types import TrainBatch

Tensor = torch.Tensor


@dataclass(kw_only=True, slots=True)
class PackedRows:
    """The THD model input of a micro-batch: its sequences back to back in one (1, T) row."""

    tokens: Tensor  # (1, T) long
    position_ids: Tensor  # (1, T) long, restarting at 0 at every sequence
    cu_seqlens: Tensor  # (b + 1,) int32 padded boundaries; the last sequence absorbs the pack's tail
    max_seqlen: int  # longest padded sequence (what RoPE and varlen kernels size for)

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[1]


@dataclass(kw_only=True, slots=True)
class MicroBatch:
    """Rows `indices` of a TrainBatch, right-padded to a common length L, and optionally packed."""

    indices: Tensor  # (b,) long, rows of the source TrainBatch
    tokens: Tensor  # (b, L) long
    position_ids: Tensor  # (b, L) long
    loss_mask: Tensor  # (b, L) float
    advantages: Tensor  # (b, L) float
    old_logprobs: Tensor  # (b, L) float
    behaviour_logprobs: Tensor  # (b, L) float
    ref_logprobs: Tensor | None  # (b, L) float
    seq_lens: Tensor  # (b,) long
    sources: Tensor | None = None  # (b,) long source codes (types.SOURCE_CODES)
    teacher_logprobs: Tensor | None = None  # (b, L) float
    teacher_topk_ids: Tensor | None = None  # (b, L, K) long
    teacher_topk_logprobs: Tensor | None = None  # (b, L, K) float
    routed_experts: Tensor | None = None  # (b, L, layers, top_k) int16 experts to replay; -1 = none
    packed: PackedRows | None = None  # the model input when sequences are packed

    @property
    def num_seqs(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    @property
    def input_shape(self) -> tuple[int, int]:
        """(batch, sequence) of what the model sees: (1, T) packed, (b, L) padded."""
        return (1, self.packed.num_tokens) if self.packed is not None else (self.num_seqs, self.seq_len)

    def model_inputs(self) -> tuple[Tensor, Tensor]:
        """(tokens, position_ids) as the model takes them."""
        if self.packed is not None:
            return self.packed.tokens, self.packed.position_ids
        return self.tokens, self.position_ids

    def prediction_index(self, rows: Tensor, cols: Tensor) -> Tensor:
        """Flat position in the model output (batch and sequence flattened) whose logits predict
        token (rows, cols) of the loss layout: the position before it, in the same sequence."""
        if self.packed is not None:
            return self.packed.cu_seqlens[:-1].long()[rows] + cols - 1
        return rows * self.seq_len + cols - 1


def random_batch(seq_lens: list[int] | tuple[int, ...], vocab_size: int, *, prompt_tokens: int = 8,
                 seed: int = 0) -> TrainBatch:
    """Random tokens in rows of these lengths: `prompt_tokens` of prompt, the rest response (loss
    mask 1), a random advantage per sequence, zero old / behaviour log-probs, learner sources.
    For benchmarks and tests that need a GRPO-shaped batch of a given length distribution."""
    gen = torch.Generator().manual_seed(seed)
    num, width = len(seq_lens), max(seq_lens)
    tokens = torch.randint(1, vocab_size, (num, width), generator=gen)
    mask = torch.zeros(num, width)
    for row, n in enumerate(seq_lens):
        tokens[row, n:] = 0
        mask[row, prompt_tokens:n] = 1.0
    zeros = torch.zeros(num, width)
    return TrainBatch(tokens=tokens, loss_mask=mask, advantages=torch.randn(num, 1, generator=gen) * mask,
                      old_logprobs=zeros.clone(), behaviour_logprobs=zeros.clone(),
                      sources=torch.zeros(num, dtype=torch.long), seq_lens=torch.tensor(list(seq_lens)))


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def pack_sequences(seq_lens: list[int], max_tokens: int, multiple: int = 1) -> list[list[int]]:
    """Group sequence positions into micro-batches of at most `max_tokens` padded tokens each.

    A micro-batch of n sequences whose longest has length l costs n * round_up(l, multiple).
    Longest first, each micro-batch is filled until the next sequence would exceed the budget.
    Returns lists of positions into `seq_lens` (longest micro-batch first).

    >>> pack_sequences([3, 9, 4, 2], max_tokens=10)
    [[1], [2, 0], [3]]
    """
    order = sorted(range(len(seq_lens)), key=lambda i: (-seq_lens[i], i))
    groups: list[list[int]] = []
    capacity = 0
    for i in order:
        length = round_up(max(int(seq_lens[i]), 1), multiple)
        _check_fits(i, int(seq_lens[i]), length, max_tokens, multiple)
        if groups and len(groups[-1]) < capacity:
            groups[-1].append(i)
        else:
            groups.append([i])
            capacity = max_tokens // length  # the first (longest) sequence fixes the length
    return groups


def bin_pack(seq_lens: list[int], max_tokens: int, multiple: int = 1) -> list[list[int]]:
    """Group sequence positions into packs of at most `max_tokens` tokens (each sequence padded
    to `multiple`): first-fit decreasing. Returns lists of positions, longest first in each pack
    and the pack holding the longest sequence first.

    >>> bin_pack([3, 9, 4, 2], max_tokens=10)
    [[1], [2, 0, 3]]
    """
    order = sorted(range(len(seq_lens)), key=lambda i: (-seq_lens[i], i))
    packs: list[list[int]] = []
    loads: list[int] = []
    for i in order:
        length = round_up(max(int(seq_lens[i]), 1), multiple)
        _check_fits(i, int(seq_lens[i]), length, max_tokens, multiple)
        slot = next((p for p, load in enumerate(loads) if load + length <= max_tokens), None)
        if slot is None:
            packs.append([i])
            loads.append(length)
        else:
            packs[slot].append(i)
            loads[slot] += length
    return packs


def _check_fits(position: int, seq_len: int, padded: int, max_tokens: int, multiple: int) -> None:
    if padded > max_tokens:
        raise ValueError(
            f"sequence {position} has {seq_len} tokens ({padded} padded to a multiple of {multiple}), "
            f"more than learner.micro_batch_tokens={max_tokens}; raise learner.micro_batch_tokens "
            "(or learner.logprob_micro_batch_tokens for log-prob passes) to at least the longest "
            "prompt + response")


def split_rows_for_data_parallel(seq_lens: list[int], dp_size: int) -> list[list[int]]:
    """Assign rows to DP ranks balancing tokens (longest first to the least-loaded rank).

    Deterministic, so every rank computes the same split from the same batch. Each rank's rows
    come back in increasing order.
    """
    if len(seq_lens) < dp_size:
        raise ValueError(f"the batch has {len(seq_lens)} sequences but there are {dp_size} data-parallel "
                         "ranks; every rank needs at least one sequence (use a larger batch)")
    loads = [0] * dp_size
    shares: list[list[int]] = [[] for _ in range(dp_size)]
    for i in sorted(range(len(seq_lens)), key=lambda i: (-seq_lens[i], i)):
        rank = min(range(dp_size), key=lambda r: (loads[r], len(shares[r]), r))
        shares[rank].append(i)
        loads[rank] += int(seq_lens[i])
    return [sorted(share) for share in shares]


def _take(values: Tensor, rows: Tensor, length: int) -> Tensor:
    """values[rows, :length] ((B, T) or (B, T, K)), zero-padded on the right past the batch width."""
    out = values.new_zeros((rows.numel(), length, *values.shape[2:]))
    width = min(length, values.shape[1])
    out[:, :width] = values[rows, :width]
    return out


def _take_optional(values: Tensor | None, rows: Tensor, length: int) -> Tensor | None:
    return None if values is None else _take(values, rows, length)


def _take_routing(values: Tensor | None, rows: Tensor, length: int) -> Tensor | None:
    """Like `_take` for (B, T, layers, k) expert ids, padded with -1 (no routing) instead of 0."""
    if values is None:
        return None
    out = values.new_full((rows.numel(), length, *values.shape[2:]), -1)
    width = min(length, values.shape[1])
    out[:, :width] = values[rows, :width]
    return out


def make_micro_batches(
    batch: TrainBatch, rows: list[int], *, max_tokens: int, multiple: int = 1, pack_multiple: int = 1,
    packed: bool = False, routing: Tensor | None = None,
) -> list[MicroBatch]:
    """Group `rows` of `batch` into token-budget micro-batches: right-padded rows
    (`pack_sequences`) or, with `packed`, THD packs (`bin_pack`) that also carry `PackedRows`.

    multiple: every sequence of a pack is padded to it. pack_multiple: a pack's total (a padded
    micro-batch's row length) is padded to it, the last sequence's padding growing
    (config.learner.token_alignment: what sequence parallel, CP and the FP8 recipe need). Packs
    stay within `max_tokens` rounded down to pack_multiple. routing: (B, T, layers, k) expert ids
    the model replays (routing.py), or None."""
    seq_lens = [int(batch.seq_lens[r]) for r in rows]
    budget = max_tokens - max_tokens % pack_multiple
    if budget < 1:
        raise ValueError(f"learner.micro_batch_tokens={max_tokens} is smaller than the pack alignment {pack_multiple}")
    # padded rows: each row's length is what the model's sequence dimension is split by
    row_multiple = multiple if packed else math.lcm(multiple, pack_multiple)
    grouping = bin_pack if packed else pack_sequences
    micro_batches = []
    for group in grouping(seq_lens, budget, row_multiple):
        index = torch.tensor([rows[g] for g in group], dtype=torch.long)
        length = round_up(max(max(seq_lens[g] for g in group), 1), row_multiple)
        micro = _loss_layout(batch, index, length)
        micro.routed_experts = _take_routing(routing, index, length)
        if packed:
            pack = _pack(micro.tokens, [seq_lens[g] for g in group], multiple)
            micro.packed = _grow_pack(pack, round_up(pack.num_tokens, pack_multiple))
        micro_batches.append(micro)
    return micro_batches


def rank_micro_batches(batch: TrainBatch, *, dp_rank: int, dp_size: int, max_tokens: int, alignment: TokenAlignment,
                       packed: bool, uniform_multiple_of: int | None = None,
                       routing: Tensor | None = None) -> list[MicroBatch]:
    """The micro-batches data-parallel rank `dp_rank` runs: its token-balanced share of the rows
    (`split_rows_for_data_parallel`), grouped within `max_tokens` and padded to `alignment`
    (config.learner.token_alignment). uniform_multiple_of: the interleaved pipeline's one shape
    and a count that is a multiple of it (`uniform_micro_batches`). routing: the (B, T, layers, k)
    experts the micro-batches carry for replay (routing.py), or None."""
    rows = split_rows_for_data_parallel([int(n) for n in batch.seq_lens], dp_size)[dp_rank]
    micro = make_micro_batches(batch, rows, max_tokens=max_tokens, multiple=alignment.sequence,
                               pack_multiple=alignment.pack, packed=packed, routing=routing)
    if uniform_multiple_of is not None:
        micro = uniform_micro_batches(micro, multiple_of=uniform_multiple_of)
    return micro


def _loss_layout(batch: TrainBatch, index: Tensor, length: int) -> MicroBatch:
    return MicroBatch(
        indices=index,
        tokens=_take(batch.tokens, index, length),
        position_ids=torch.arange(length).unsqueeze(0).expand(index.numel(), length).contiguous(),
        loss_mask=_take(batch.loss_mask.float(), index, length),
        advantages=_take(batch.advantages.float(), index, length),
        old_logprobs=_take(batch.old_logprobs.float(), index, length),
        behaviour_logprobs=_take(batch.behaviour_logprobs.float(), index, length),
        ref_logprobs=None if batch.ref_logprobs is None else _take(batch.ref_logprobs.float(), index, length),
        seq_lens=batch.seq_lens[index].clone(),
        sources=batch.sources[index].clone(),
        teacher_logprobs=_take_optional(batch.teacher_logprobs, index, length),
        teacher_topk_ids=_take_optional(batch.teacher_topk_ids, index, length),
        teacher_topk_logprobs=_take_optional(batch.teacher_topk_logprobs, index, length),
    )


def _pack(tokens: Tensor, seq_lens: list[int], multiple: int) -> PackedRows:
    """Rows of `tokens` (b, L), each cut to its length padded to `multiple`, back to back."""
    padded = [round_up(max(n, 1), multiple) for n in seq_lens]
    cu_seqlens = torch.zeros(len(padded) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.tensor(padded).cumsum(0)
    return PackedRows(
        tokens=torch.cat([tokens[j, :p] for j, p in enumerate(padded)]).unsqueeze(0),
        position_ids=torch.cat([torch.arange(p) for p in padded]).unsqueeze(0),
        cu_seqlens=cu_seqlens, max_seqlen=max(padded))


def _grow_pack(packed: PackedRows, num_tokens: int) -> PackedRows:
    """`packed` with its last sequence's padding extended to `num_tokens` tokens in all."""
    extra = num_tokens - packed.num_tokens
    if extra < 0:
        raise ValueError(f"cannot shrink a pack of {packed.num_tokens} tokens to {num_tokens}")
    if extra == 0:
        return packed
    cu_seqlens = packed.cu_seqlens.clone()
    cu_seqlens[-1] = num_tokens
    last_start = int(packed.cu_seqlens[-2])
    return PackedRows(
        tokens=torch.cat([packed.tokens, packed.tokens.new_zeros(1, extra)], dim=1),
        position_ids=torch.cat([packed.position_ids, packed.position_ids.new_tensor(
            [list(range(packed.num_tokens - last_start, num_tokens - last_start))])], dim=1),
        cu_seqlens=cu_seqlens, max_seqlen=max(packed.max_seqlen, num_tokens - last_start))


def pad_micro_batch(micro: MicroBatch, *, num_seqs: int, seq_len: int) -> MicroBatch:
    """`micro` grown to (num_seqs, seq_len): extra rows (index -1) and columns carry no loss.

    Used where the pipeline schedule needs one shape for all micro-batches of a step.
    """
    if num_seqs < micro.num_seqs or seq_len < micro.seq_len:
        raise ValueError(f"cannot shrink a ({micro.num_seqs}, {micro.seq_len}) micro-batch to ({num_seqs}, {seq_len})")

    def grow(values: Tensor | None, fill: int = 0) -> Tensor | None:  # (b, L) or (b, L, ...)
        if values is None:
            return None
        out = values.new_full((num_seqs, seq_len, *values.shape[2:]), fill)
        out[:micro.num_seqs, :micro.seq_len] = values
        return out

    seq_lens = micro.seq_lens.new_ones(num_seqs)
    seq_lens[:micro.num_seqs] = micro.seq_lens
    indices = micro.indices.new_full((num_seqs,), -1)
    indices[:micro.num_seqs] = micro.indices
    sources = None
    if micro.sources is not None:
        sources = micro.sources.new_zeros(num_seqs)
        sources[:micro.num_seqs] = micro.sources
    return MicroBatch(
        indices=indices,
        tokens=grow(micro.tokens),
        position_ids=torch.arange(seq_len).unsqueeze(0).expand(num_seqs, seq_len).contiguous(),
        loss_mask=grow(micro.loss_mask),
        advantages=grow(micro.advantages),
        old_logprobs=grow(micro.old_logprobs),
        behaviour_logprobs=grow(micro.behaviour_logprobs),
        ref_logprobs=grow(micro.ref_logprobs),
        seq_lens=seq_lens,
        sources=sources,
        teacher_logprobs=grow(micro.teacher_logprobs),
        teacher_topk_ids=grow(micro.teacher_topk_ids),
        teacher_topk_logprobs=grow(micro.teacher_topk_logprobs),
        routed_experts=grow(micro.routed_experts, -1),
    )


def uniform_micro_batches(micro_batches: list[MicroBatch], *, multiple_of: int = 1) -> list[MicroBatch]:
    """One model-input shape for every micro-batch, and a count that is a multiple of `multiple_of`.

    For megatron's interleaved pipeline schedule, which needs one activation shape per step and
    a number of micro-batches divisible by the pipeline size. Padded micro-batches grow to the
    largest (num_seqs, seq_len); packs grow to the longest pack (the last sequence's padding
    extends). Filler rows and micro-batches have no loss tokens, so the loss and the gradients
    are unchanged.
    """
    if micro_batches[0].packed is not None:
        num_tokens = max(m.packed.num_tokens for m in micro_batches)
        out = [replace(m, packed=_grow_pack(m.packed, num_tokens)) for m in micro_batches]
    else:
        num_seqs = max(m.num_seqs for m in micro_batches)
        seq_len = max(m.seq_len for m in micro_batches)
        out = [pad_micro_batch(m, num_seqs=num_seqs, seq_len=seq_len) for m in micro_batches]
    while len(out) % multiple_of:
        last = out[-1]
        out.append(replace(last, indices=torch.full_like(last.indices, -1), loss_mask=torch.zeros_like(last.loss_mask)))
    return out


def scatter_rows(values: list[tuple[Tensor, Tensor]], num_seqs: int, seq_len: int) -> Tensor:
    """Assemble per-micro-batch (indices (b,), values (b, L)) into a (num_seqs, seq_len) tensor.

    Rows not covered stay 0; columns past a micro-batch's L are 0 (they are padding). Indices
    of -1 (padding micro-batches) are skipped.
    """
    out = torch.zeros(num_seqs, seq_len, dtype=torch.float32)
    for indices, rows in values:
        keep = indices >= 0
        width = min(seq_len, rows.shape[1])
        out[indices[keep], :width] = rows[keep, :width].float().cpu()
    return out
