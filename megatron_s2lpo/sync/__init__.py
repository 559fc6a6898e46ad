"""Weight sync: the learner's megatron weights -> HF-named buckets -> its rollout engine.

weight_sync  WeightSync (sync(version) -> SyncResult), the version check
transports   disk | buckets (in-process) | tensor (CUDA IPC) | distributed (NCCL), ROUTES
disk         atomic HF safetensors directories, pruning
exporter     bucket sources: the live megatron learner, or a dict of HF tensors
parity       engine vs learner log-probs of the engine's samples (WeightParityError)
collective   run a step on the driver rank, share its result or error with every rank
errors       WeightVersionError, WeightParityError

The only package that knows both the megatron learner and the rollout engines. Importing it
loads nothing heavy; the names below load on first use. See docs/sync.md.
"""

from __future__ import annotations

from megatron_s2lpo.utils.lazy import lazy_exports

_EXPORTS = {
    "WeightSync": "weight_sync",
    "SyncResult": "weight_sync",
    "verify_version": "weight_sync",
    "TRANSPORTS": "transports",
    "ROUTES": "transports",
    "route": "transports",
    "DiskTransport": "disk",
    "MegatronExporter": "exporter",
    "StateDictExporter": "exporter",
    "ParityReport": "parity",
    "check_parity": "parity",
    "WeightVersionError": "errors",
    "WeightParityError": "errors",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS, globals())
