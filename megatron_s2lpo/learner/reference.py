"""Frozen reference policy for the KL penalty: a second set of GPTModel chunks, no optimizer.

It has the policy's architecture and parallel layout, so its log-probs come from the same
vocab-parallel code path. Its weights are either a copy of the policy's initial weights
(`copy_from`, the usual GRPO reference) or a dist checkpoint (`load`, any TP/PP layout).
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_s2lpo.config.model import ModelArch

from .model import build_model_chunks, unwrap_model
from .parallel import ParallelGroups


class ReferenceModel:
    """Frozen GPTModel chunks (eval mode, requires_grad False)."""

    def __init__(self, arch: ModelArch, groups: ParallelGroups, **build_kwargs: Any) -> None:
        self.chunks = build_model_chunks(arch, groups, **build_kwargs)
        for chunk in self.chunks:
            chunk.eval()
            chunk.requires_grad_(False)

    @torch.no_grad()
    def copy_from(self, policy_chunks: list[Any]) -> None:
        """Copy the weights of the policy's chunks (same layout; wrappers are unwrapped)."""
        for ref, policy in zip(self.chunks, policy_chunks, strict=True):
            source = unwrap_model(policy).state_dict()
            missing, unexpected = ref.load_state_dict(source, strict=False)
            missing = [k for k in missing if not k.endswith("_extra_state")]
            if missing or unexpected:
                raise ValueError(f"reference and policy chunks differ: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")

    def load(self, path: str) -> int:
        """Load weights (only) from a dist checkpoint or checkpoint root; returns its step."""
        from .checkpoint import load_checkpoint

        return load_checkpoint(path, model_chunks=self.chunks, load_rng=False).step
