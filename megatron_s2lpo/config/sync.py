"""Weight-sync section: how the learner's new weights reach its rollout engine."""

from __future__ import annotations

from dataclasses import dataclass

from .base import check

SYNC_TRANSPORTS = ("disk", "distributed", "tensor")
GROUP_BACKENDS = ("nccl", "gloo")


@dataclass(kw_only=True, slots=True)
class SyncConfig:
    transport: str = "disk"  # disk (any setup) | tensor (colocated, CUDA IPC) | distributed (NCCL)
    bucket_bytes: int = 512 * 1024 * 1024
    disk_dir: str = ""  # where the disk transport writes; empty: <run.output_dir>/sync
    disk_keep: int = 2  # newest sync directories kept under disk_dir (the engine's current one included)
    parity_every: int = 1  # check server vs learner log-probs every N syncs; 0 = never
    parity_num_sequences: int = 4
    parity_max_new_tokens: int = 16  # length limit of the parity completions
    parity_threshold: float = 1e-3  # mean |delta logp| above which the sync fails loudly
    # distributed transport: rendezvous of the trainer (rank 0) with the server's ranks
    master_address: str = ""  # an address of this host the server reaches; empty: the route to the server
    master_port: int = 0  # 0: a free port
    # The weight-update group's backend: nccl on GPUs; gloo moves CPU tensors (CPU tests, the
    # protocol test server, the sync benchmark).
    group_backend: str = "nccl"
    # The group's rendezvous and every broadcast give up after this long (a replica that never
    # receives cannot keep the trainer waiting longer).
    group_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        check(self.transport in SYNC_TRANSPORTS,
              f"sync.transport must be one of {SYNC_TRANSPORTS}, got {self.transport!r}")
        check(self.bucket_bytes >= 1024 * 1024,
              f"sync.bucket_bytes must be at least 1 MiB, got {self.bucket_bytes}")
        check(self.disk_keep >= 1, f"sync.disk_keep must be >= 1 (the engine's current weights), "
              f"got {self.disk_keep}")
        check(self.parity_every >= 0, f"sync.parity_every must be >= 0, got {self.parity_every}")
        check(self.parity_num_sequences >= 1,
              f"sync.parity_num_sequences must be >= 1, got {self.parity_num_sequences}")
        check(self.parity_max_new_tokens >= 1,
              f"sync.parity_max_new_tokens must be >= 1, got {self.parity_max_new_tokens}")
        check(self.parity_threshold > 0, f"sync.parity_threshold must be > 0, got {self.parity_threshold}")
        check(self.group_backend in GROUP_BACKENDS,
              f"sync.group_backend must be one of {GROUP_BACKENDS}, got {self.group_backend!r}")
        check(self.group_timeout_s > 0, f"sync.group_timeout_s must be > 0, got {self.group_timeout_s}")
        check(0 <= self.master_port <= 65535,
              f"sync.master_port must be in 0..65535 (0 = a free port), got {self.master_port}")
