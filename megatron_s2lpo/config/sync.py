"""Weight-sync section: how the learner's new weights reach its rollout engine."""

from __future__ import annotations

from dataclasses import dataclass

from .base import check

SYNC_TRANSPORTS = ("disk", "distributed", "tensor")


@dataclass(kw_only=True, slots=True)
class SyncConfig:
    transport: str = "disk"  # disk (any setup) | tensor (colocated, CUDA IPC) | distributed (NCCL)
    bucket_bytes: int = 512 * 1024 * 1024
    disk_dir: str = ""  # where the disk transport writes; empty: <run.output_dir>/sync
    parity_every: int = 1  # check server vs learner log-probs every N syncs; 0 = never
    parity_num_sequences: int = 4
    parity_threshold: float = 1e-3  # mean |delta logp| above which the sync fails loudly

    def __post_init__(self) -> None:
        check(self.transport in SYNC_TRANSPORTS,
              f"sync.transport must be one of {SYNC_TRANSPORTS}, got {self.transport!r}")
        check(self.bucket_bytes >= 1024 * 1024,
              f"sync.bucket_bytes must be at least 1 MiB, got {self.bucket_bytes}")
        check(self.parity_every >= 0, f"sync.parity_every must be >= 0, got {self.parity_every}")
        check(self.parity_num_sequences >= 1,
              f"sync.parity_num_sequences must be >= 1, got {self.parity_num_sequences}")
        check(self.parity_threshold > 0, f"sync.parity_threshold must be > 0, got {self.parity_threshold}")
