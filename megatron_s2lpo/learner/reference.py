"""Frozen reference policy for the KL penalty: a second set of GPTModel chunks, no optimizer.

It has the policy's architecture and parallel layout, so its log-probs come from the same
vocab-parallel code path. Its weights are either a copy of the policy's initial weights
(`copy_from`, the usual GRPO reference) or a dist checkpoint (`load`, any TP/PP layout).

With `offload=True` (learner.ref_offload) the weights live in host memory and come to the
device only for the reference pass (`on_device()`): one host-to-device copy of this rank's
share of the weights per step (on an H100, about 4 GB for an 8B bf16 model at TP=4, ~0.2 s over
PCIe 5 with pinned memory) instead of a second full copy of the policy's weights in GPU memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from megatron_s2lpo.config.model import ModelArch

from .model import build_model_chunks, unwrap_model
from .offload import StorageOffloader, module_tensors
from .parallel import ParallelGroups


class ReferenceModel:
    """Frozen GPTModel chunks (eval mode, requires_grad False), optionally kept in host memory."""

    def __init__(self, arch: ModelArch, groups: ParallelGroups, *, offload: bool = False,
                 **build_kwargs: Any) -> None:
        self.chunks = build_model_chunks(arch, groups, **build_kwargs)
        for chunk in self.chunks:
            chunk.eval()
            chunk.requires_grad_(False)
        self._offloader: StorageOffloader | None = None
        if offload:
            self._offloader = StorageOffloader()
            self._offloader.add(module_tensors(self.chunks))
            self._offloader.offload()

    @property
    def offloaded(self) -> bool:
        return self._offloader is not None and self._offloader.offloaded

    @contextlib.contextmanager
    def on_device(self) -> Iterator[list[Any]]:
        """The chunks with their weights on the device for the duration of the block."""
        if self._offloader is None:
            yield self.chunks
            return
        self._offloader.onload()
        try:
            yield self.chunks
        finally:
            self._offloader.offload()

    @torch.no_grad()
    def copy_from(self, policy_chunks: list[Any]) -> None:
        """Copy the weights of the policy's chunks (same layout; wrappers are unwrapped)."""
        with self.on_device() as chunks:
            for ref, policy in zip(chunks, policy_chunks, strict=True):
                source = unwrap_model(policy).state_dict()
                missing, unexpected = ref.load_state_dict(source, strict=False)
                missing = [k for k in missing if not k.endswith("_extra_state")]
                if missing or unexpected:
                    raise ValueError(f"reference and policy chunks differ: missing {missing[:5]}, "
                                     f"unexpected {unexpected[:5]}")

    def load(self, path: str) -> int:
        """Load weights (only) from a dist checkpoint or checkpoint root; returns its step."""
        from .checkpoint import load_checkpoint

        with self.on_device() as chunks:
            return load_checkpoint(path, model_chunks=chunks, load_rng=False).step
