"""Rank-0 work and barriers that also hold without torch.distributed (a single process)."""

from __future__ import annotations

import torch.distributed as dist


def is_rank0() -> bool:
    """Global rank 0, or the only process when torch.distributed is not initialised."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """dist.barrier() over the default group; nothing in a single process."""
    if dist.is_initialized():
        dist.barrier()
