"""Rank-0 work and barriers that also hold without torch.distributed (a single process)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_rank0() -> bool:
    """Global rank 0, or the only process when torch.distributed is not initialised."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """dist.barrier() over the default group; nothing in a single process."""
    if dist.is_initialized():
        dist.barrier()


def on_any_rank(flag: bool) -> bool:
    """True if `flag` holds on some rank of the default group (all ranks must call it); `flag`
    itself in a single process."""
    if not dist.is_initialized():
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
