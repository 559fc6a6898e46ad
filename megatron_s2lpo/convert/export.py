"""Streaming export of a live, sharded megatron learner as HF-named full tensors, in buckets.

    for bucket in iter_hf_buckets(model_chunks, groups, arch, bucket_bytes=512 << 20):
        for name, tensor in bucket:  # e.g. "model.layers.3.self_attn.q_proj.weight", full shape
            ...
    for flat in iter_flat_buckets(model_chunks, groups, arch, bucket_bytes=512 << 20):
        send(flat.buffer[:flat.nbytes], flat.names, flat.offsets, ...)  # before the next one

Contract
- Every rank of the model-parallel group (all TP ranks of all PP stages) must call it together,
  and every one of them receives the SAME sequence of buckets: names in the global order of
  `mapping.param_maps(arch)` (embedding, layers 0..L-1, final norm, lm_head), HF shapes,
  vocab padding removed. Data-parallel replicas hold identical weights and export independently;
  consumers usually keep the buckets of one rank (e.g. global rank 0) and drop the rest.
- Tensors live on the model's device (`groups.device`) in the parameters' dtype and are
  contiguous copies, never views of parameters. `iter_hf_buckets` allocates fresh tensors (keep
  them as long as you like); `iter_flat_buckets` writes into one flat buffer that the next bucket
  reuses (no allocation per bucket, one buffer per broadcast / IPC handle).
- Memory: at most one bucket plus one gathered parameter per rank; the model is never
  materialised. A tensor larger than `bucket_bytes` forms a bucket of its own.

Collectives, all in one deterministic order derived from `arch` (never from local dicts):
one `all_gather_object` over the PP group at the start (who owns which parameter and its
dtype; with expert parallelism first over the EP group, whose ranks hold different experts),
then per parameter an `all_gather` over the owning stage's TP group (skipped for replicated
norms and TP=1; the expert-TP group for expert weights), for an expert weight with EP > 1 a
`broadcast` of the full tensor from the expert-parallel rank that holds it over the EP group,
and, with PP > 1, a `broadcast` of each of its HF tensors from the owning stage over the PP
group. Consume the iterators to the end on every rank: stopping early on one rank leaves the
others waiting in a collective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

from megatron_s2lpo.config.model import ModelArch

from . import mapping as M
from .live import owned_params

Bucket = list[tuple[str, torch.Tensor]]


def bucketize(items: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[Bucket]:
    """Pack (name, tensor) pairs in order into lists of at most `bucket_bytes` (or one tensor)."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    bucket: Bucket = []
    size = 0
    for name, tensor in items:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def _gather_tp(pm: M.ParamMap, param: torch.Tensor, group: Any, tp_size: int) -> torch.Tensor:
    """The full megatron tensor of `param` from all ranks of its TP group."""
    shard = param.detach()
    if tp_size == 1:
        return shard
    if pm.tp_split == M.REPLICATED:
        return shard
    shard = shard.contiguous()
    parts = [torch.empty_like(shard) for _ in range(tp_size)]
    dist.all_gather(parts, shard, group=group)
    return M.merge_tp(pm, parts)


def _ownership(model_chunks: Sequence[Any], arch: ModelArch, groups: Any
               ) -> tuple[str, dict[str, torch.Tensor], dict[str, tuple[int, str]]]:
    """(naming, this rank's params, {global name: (owning PP rank, dtype name)}) for all params."""
    naming, params = owned_params(model_chunks, arch)
    mine = {name: str(p.dtype).removeprefix("torch.") for name, p in params.items()}
    if getattr(groups, "ep_size", 1) > 1:  # the stage holds every EP rank's experts
        shares: list[Any] = [None] * groups.ep_size
        dist.all_gather_object(shares, mine, group=groups.ep_group)
        mine = {name: dtype for share in shares for name, dtype in share.items()}
    if groups.pp_size > 1:
        stages: list[Any] = [None] * groups.pp_size
        dist.all_gather_object(stages, (naming, mine), group=groups.pp_group)
    else:
        stages = [(naming, mine)]
    namings = {n for n, names in stages if names}
    if len(namings) != 1:
        raise ValueError(f"pipeline stages use different megatron layer specs: {sorted(namings)}")
    naming = namings.pop()
    owner: dict[str, tuple[int, str]] = {}
    for stage, (_, names) in enumerate(stages):
        for name, dtype in names.items():
            if name in owner:
                raise ValueError(f"megatron parameter {name!r} is held by pipeline stages "
                                 f"{owner[name][0]} and {stage}")
            owner[name] = (stage, dtype)
    grouped = M.detect_grouped(list(owner))
    missing = [pm.mcore_name for pm in M.param_maps(arch, naming, grouped) if pm.mcore_name not in owner]
    if missing:
        raise ValueError(f"no pipeline stage holds megatron parameters {M.few_names(missing)}; "
                         f"does the model match {arch}?")
    return naming, params, owner


def _full_on_owner(pm: M.ParamMap, params: dict, groups: Any, arch: ModelArch, dtype: torch.dtype
                   ) -> list[torch.Tensor]:
    """On the owning stage: copy-free views of the HF tensors of `pm` (after the TP gather; an
    expert weight gathered over expert-TP by the EP rank that holds it, then broadcast over EP)."""
    if pm.expert is None:
        full = _gather_tp(pm, params[pm.mcore_name], groups.tp_group, groups.tp_size)
    elif getattr(groups, "ep_size", 1) == 1:
        full = _gather_tp(pm, params[pm.mcore_name], groups.etp_group, groups.etp_size)
    else:
        holder = M.expert_owner(pm.expert, arch.num_experts, groups.ep_size)[0]
        if holder == groups.ep_rank:
            full = _gather_tp(pm, params[pm.mcore_name], groups.etp_group, groups.etp_size).contiguous()
        else:
            full = torch.empty(M.mcore_shape(pm, arch, 0), dtype=dtype, device=groups.device)
        dist.broadcast(full, src=dist.get_global_rank(groups.ep_group, holder), group=groups.ep_group)
    return [view for _, view in M.mcore_to_hf_views(pm, arch, full.contiguous())]


def _pp_source(groups: Any) -> list[int] | None:
    return dist.get_process_group_ranks(groups.pp_group) if groups.pp_size > 1 else None


def takes_part_in_export(groups: Any) -> bool:
    """Whether this rank takes part in exporting the data-parallel replica of global rank 0.

    Dense models: the ranks of data-parallel rank 0 (every TP / PP rank of that replica). With
    expert parallelism the replica's experts live on ranks of other data-parallel ranks (EP is
    carved out of DP), so their EP groups take part too, and with them their TP groups: the set
    is closed over the EP and TP groups (a MAX all-reduce of the flag over each, until stable)."""
    flag = groups.dp_rank == 0
    if getattr(groups, "ep_size", 1) == 1:
        return flag
    value = torch.tensor([int(flag)], device=groups.device)
    for _ in range(3):  # EP -> TP -> EP reaches every rank an export collective needs
        for group in (groups.ep_group, groups.tp_group):
            dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value.item())


def iter_hf_tensors(model_chunks: Sequence[Any], groups: Any, arch: ModelArch
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named full tensors one at a time, freshly allocated, the same on every MP rank.

    model_chunks: this rank's model chunks (a list of one without virtual pipeline), possibly
    wrapped in DDP / Float16Module. groups: `learner.parallel.ParallelGroups` (uses tp_group,
    tp_size, pp_group, pp_rank, pp_size, device).
    """
    naming, params, owner = _ownership(model_chunks, arch, groups)
    pp_ranks = _pp_source(groups)
    for pm in M.param_maps(arch, naming, M.detect_grouped(list(owner))):
        stage, dtype = owner[pm.mcore_name]
        views = (_full_on_owner(pm, params, groups, arch, getattr(torch, dtype)) if stage == groups.pp_rank
                 else None)
        for i, (name, shape) in enumerate(zip(pm.hf_names, M.hf_shapes(pm, arch))):
            tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=groups.device)
            if views is not None:  # one copy: the result never aliases a live parameter
                tensor.view(views[i].shape).copy_(views[i])
            if pp_ranks is not None:
                dist.broadcast(tensor, src=pp_ranks[stage], group=groups.pp_group)
            yield name, tensor


def iter_hf_buckets(model_chunks: Sequence[Any], groups: Any, arch: ModelArch,
                    bucket_bytes: int = 512 << 20) -> Iterator[Bucket]:
    """`iter_hf_tensors` packed into buckets of at most `bucket_bytes` (see the module docstring).

    Consume the iterator to the end on every rank: stopping early on one rank leaves the others
    waiting in a collective.
    """
    yield from bucketize(iter_hf_tensors(model_chunks, groups, arch), bucket_bytes)


@dataclass(kw_only=True, slots=True)
class FlatBucket:
    """HF tensors packed in one flat byte buffer that is REUSED by the next bucket.

    Valid until the next bucket is requested: send, write or copy it before then. One
    contiguous buffer suits one broadcast / one CUDA-IPC handle per bucket.
    """

    buffer: torch.Tensor  # (capacity,) uint8, the same storage for every bucket of an export
    names: list[str]
    offsets: list[int]  # byte offset of each tensor in `buffer` (16-byte aligned)
    shapes: list[tuple[int, ...]]
    dtypes: list[torch.dtype]
    nbytes: int  # buffer[:nbytes] holds the whole bucket

    def tensors(self) -> Bucket:
        """(name, view into `buffer`) pairs, contiguous, in export order."""
        out = []
        for name, offset, shape, dtype in zip(self.names, self.offsets, self.shapes, self.dtypes):
            size = math.prod(shape) * dtype.itemsize
            out.append((name, self.buffer[offset: offset + size].view(dtype).view(shape)))
        return out


_ALIGN = 16


def _flat_buffer_bytes(arch: ModelArch, maps: list[M.ParamMap], itemsize: dict[str, int],
                       bucket_bytes: int) -> int:
    """min(bucket_bytes, whole model) but at least the largest tensor, in bytes."""
    sizes = [math.prod(shape) * itemsize[pm.mcore_name] for pm in maps for shape in M.hf_shapes(pm, arch)]
    total = sum(-(-size // _ALIGN) * _ALIGN for size in sizes)
    return max(min(bucket_bytes, total), max(sizes))


def iter_flat_buckets(model_chunks: Sequence[Any], groups: Any, arch: ModelArch,
                      bucket_bytes: int = 512 << 20, *, buffer: torch.Tensor | None = None
                      ) -> Iterator[FlatBucket]:
    """The export of `iter_hf_buckets`, written into one reused buffer (no allocation per bucket).

    Each HF tensor is copied into the buffer once from a view of the (gathered) parameter, and
    received there directly with PP > 1. buffer: the `.buffer` of a bucket of an earlier export
    with the same `bucket_bytes`, to reuse its memory across exports (weight syncs); None
    allocates min(bucket_bytes, model bytes), at least the largest tensor.
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    naming, params, owner = _ownership(model_chunks, arch, groups)
    maps = M.param_maps(arch, naming, M.detect_grouped(list(owner)))
    itemsize = {pm.mcore_name: getattr(torch, owner[pm.mcore_name][1]).itemsize for pm in maps}
    needed = _flat_buffer_bytes(arch, maps, itemsize, bucket_bytes)
    if buffer is None:
        buffer = torch.empty(needed, dtype=torch.uint8, device=groups.device)
    elif buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() < needed:
        raise ValueError(f"buffer must be a 1-D uint8 tensor of >= {needed} bytes (the .buffer of an "
                         f"earlier export), got {buffer.dtype} of shape {tuple(buffer.shape)}")
    pp_ranks = _pp_source(groups)
    bucket = FlatBucket(buffer=buffer, names=[], offsets=[], shapes=[], dtypes=[], nbytes=0)
    for pm in maps:
        stage, dtype_name = owner[pm.mcore_name]
        dtype = getattr(torch, dtype_name)
        views = _full_on_owner(pm, params, groups, arch, dtype) if stage == groups.pp_rank else None
        for i, (name, shape) in enumerate(zip(pm.hf_names, M.hf_shapes(pm, arch))):
            size = math.prod(shape) * dtype.itemsize
            start = -(-bucket.nbytes // _ALIGN) * _ALIGN
            if bucket.names and start + size > bucket_bytes:
                yield bucket
                bucket = FlatBucket(buffer=buffer, names=[], offsets=[], shapes=[], dtypes=[], nbytes=0)
                start = 0
            dst = buffer[start: start + size].view(dtype).view(shape)
            if views is not None:
                dst.view(views[i].shape).copy_(views[i])
            if pp_ranks is not None:
                dist.broadcast(dst, src=pp_ranks[stage], group=groups.pp_group)
            bucket.names.append(name)
            bucket.offsets.append(start)
            bucket.shapes.append(tuple(shape))
            bucket.dtypes.append(dtype)
            bucket.nbytes = start + size
    if bucket.names:
        yield bucket
