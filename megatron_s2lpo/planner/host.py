"""Host memory of a learner node: what the learner keeps in (pinned) host memory besides the GPUs.

Per learner rank, then times the ranks of a node (every rank of a node is assumed as large as the
busiest, an upper bound):

  reference      the frozen reference model's weights with learner.ref_offload (pinned, so the
                 copy to the device overlaps nothing else and runs at PCIe speed)
  optimizer      the share of Adam's state optim.cpu_offload keeps on the host
  checkpoint     the save's staging copy: dp_reshardable holds this rank's optimizer shard and,
                 on the DP rank that writes them, the model weights; fully_reshardable gathers the
                 whole TP shard's fp32 params and Adam moments on every DP rank (plus the local
                 shards). A synchronous save frees it when written; an asynchronous one holds it
                 until its forked writer is done
  offload        Learner.offload() for a colocated rollout server: weights and optimizer state

Pure arithmetic like estimate.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_s2lpo.config.learner import LearnerConfig
from megatron_s2lpo.config.model import ModelArch

from .estimate import DTYPE_BYTES, GIB, Item, expert_params, optimizer_bytes, stage_params


@dataclass(frozen=True, kw_only=True, slots=True)
class HostMemory:
    items: tuple[Item, ...]  # per learner rank
    ranks_per_node: int

    @property
    def per_rank(self) -> float:
        return sum(i.bytes for i in self.items)

    @property
    def per_node(self) -> float:
        return self.per_rank * self.ranks_per_node

    def text(self) -> str:
        parts = ", ".join(f"{i.name} {i.bytes / GIB:.1f}" for i in self.items if i.bytes)
        return (f"host memory per learner node: {self.per_node / GIB:.0f} GB ({self.ranks_per_node} ranks x "
                f"{self.per_rank / GIB:.1f} GB: {parts or 'nothing'})")


def estimate_host(arch: ModelArch, cfg: LearnerConfig, *, dp_size: int, with_reference: bool,
                  ranks_per_node: int, colocated: bool = False) -> HostMemory:
    """Host memory of the busiest learner rank (module docstring), on the first pipeline stage
    (the embedding makes it the largest but for a tied last stage, which the difference ignores)."""
    tp, pp = cfg.tensor_parallel_size, cfg.pipeline_parallel_size
    ep, etp = cfg.expert_model_parallel_size, cfg.expert_tensor_parallel_size
    params, _ = stage_params(arch, tp, pp, 0, ep=ep, etp=etp)  # a MoE rank holds only its experts
    experts = expert_params(arch, pp, ep, etp)
    d = DTYPE_BYTES[cfg.precision]
    weights = params * d
    optim_host = optimizer_bytes(params, cfg, dp_size, on_host=True, experts=experts)
    optim_all = optimizer_bytes(params, cfg, dp_size, experts=experts) + optim_host
    if cfg.optim.use_distributed_optimizer and cfg.checkpoint.optimizer_sharding == "fully_reshardable":
        staging = params * 12 + optim_all + weights  # every DP rank: the TP shard's fp32 params + moments
    else:
        staging = optim_all + weights
    note = "async: held while the writer runs" if cfg.checkpoint.async_save else "freed once written"
    items = (
        Item(name="reference", bytes=weights if with_reference and cfg.ref_offload else 0.0, note="pinned"),
        Item(name="optimizer", bytes=optim_host, note="optim.cpu_offload"),
        Item(name="checkpoint", bytes=staging, note=f"{cfg.checkpoint.optimizer_sharding} staging, {note}"),
        Item(name="offload", bytes=(weights + optim_all) if colocated else 0.0, note="Learner.offload()"),
    )
    return HostMemory(items=items, ranks_per_node=ranks_per_node)
