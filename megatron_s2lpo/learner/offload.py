"""Move a model's (and optimizer's) tensors to host memory and back, releasing device memory.

A colocated SGLang server shares the learner's GPUs: between training phases the learner
offloads its weights, gradient buffers and optimizer state so the server can use that memory
(its KV cache), and onloads them before the next phase. The reference model lives in host
memory the same way and comes to the device only for its log-prob pass.

How: every tensor megatron keeps (parameters, the DDP's contiguous param / grad buffers, the
optimizer's fp32 main weights and Adam moments) is a view of some storage. `StorageOffloader`
copies each distinct storage to a host buffer (pinned with CUDA) and shrinks the storage to 0
bytes (`untyped_storage().resize_(0)`); onload grows it back and copies the bytes in. Views stay
valid because they keep pointing at the same storage object, so megatron's bookkeeping (param
-> bucket maps, `main_grad` views, optimizer param groups) survives untouched. This is how
torch's FSDP frees and refills flat parameters, and how verl offloads megatron's buffers.
Storages that hold only gradients can be dropped instead of copied (`keep_values=False`): they
are zeroed before the next step anyway.

On a CPU-only machine the same code runs (the "device" copy is released and a host copy kept),
which is what the tests exercise; the GPU memory released is measured on a GPU
(`torch.cuda.memory_allocated`, docs/learner.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass(kw_only=True, slots=True)
class _Entry:
    storage: torch.UntypedStorage
    nbytes: int
    device: torch.device
    keep_values: bool
    host: Tensor | None = None  # (nbytes,) uint8 while offloaded


def _bytes_view(storage: torch.UntypedStorage, device: torch.device, nbytes: int) -> Tensor:
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage, 0, (nbytes,))


class StorageOffloader:
    """Offload / onload a fixed set of tensors by their storages (module docstring)."""

    def __init__(self) -> None:
        self._entries: dict[int, _Entry] = {}
        self.offloaded = False

    def add(self, tensors: Iterable[Tensor | None], *, keep_values: bool = True) -> None:
        """Track the storages of `tensors` (None and empty ones are skipped; a storage seen twice
        keeps its values if any of its tensors asked for it)."""
        if self.offloaded:
            raise RuntimeError("add tensors before offloading, not while offloaded")
        for tensor in tensors:
            if tensor is None or not isinstance(tensor, Tensor) or tensor.untyped_storage().nbytes() == 0:
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            entry = self._entries.get(key)
            if entry is None:
                self._entries[key] = _Entry(storage=storage, nbytes=storage.nbytes(), device=tensor.device,
                                            keep_values=keep_values)
            else:
                entry.keep_values = entry.keep_values or keep_values

    @property
    def nbytes(self) -> int:
        """Bytes of device memory the tracked storages take when onloaded."""
        return sum(e.nbytes for e in self._entries.values())

    def offload(self) -> None:
        """Copy kept values to host memory and release every tracked storage, and the caching
        allocator's cached blocks with them (idempotent)."""
        if self.offloaded:
            return
        pin = torch.cuda.is_available()
        for entry in self._entries.values():
            if entry.keep_values:
                entry.host = torch.empty(entry.nbytes, dtype=torch.uint8, pin_memory=pin)
                entry.host.copy_(_bytes_view(entry.storage, entry.device, entry.nbytes), non_blocking=pin)
        if pin:
            torch.cuda.synchronize()  # the copies must land before the storages are released
        for entry in self._entries.values():
            entry.storage.resize_(0)
        if pin:
            torch.cuda.empty_cache()  # hand the released blocks back to the driver, for the server
        self.offloaded = True

    def onload(self) -> None:
        """Re-allocate every tracked storage and copy its values back (zeros if not kept)."""
        if not self.offloaded:
            return
        for entry in self._entries.values():
            entry.storage.resize_(entry.nbytes)
            view = _bytes_view(entry.storage, entry.device, entry.nbytes)
            if entry.host is not None:
                view.copy_(entry.host, non_blocking=entry.host.is_pinned())
                entry.host = None
            else:
                view.zero_()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.offloaded = False


def module_tensors(modules: Iterable[torch.nn.Module]) -> list[Tensor]:
    """Parameters and buffers of `modules` (their storages include megatron DDP's param buffer)."""
    out: list[Tensor] = []
    for module in modules:
        out += [p.data for p in module.parameters()]
        out += list(torch.nn.Module.buffers(module))  # megatron's DDP shadows .buffers with its grad buffers
    return out


def ddp_buffers(chunks: Iterable[torch.nn.Module]) -> tuple[list[Tensor], list[Tensor]]:
    """(param buffers, grad buffers) of megatron DDP-wrapped chunks (all bucket groups)."""
    params, grads = [], []
    for chunk in chunks:
        for buffer in list(getattr(chunk, "buffers", [])) + list(getattr(chunk, "expert_parallel_buffers", [])):
            params.append(getattr(buffer, "param_data", None))
            grads.append(getattr(buffer, "grad_data", None))
    return params, grads


def optimizer_tensors(optimizer: object) -> list[Tensor]:
    """Main weights and state of a megatron optimizer (chained ones included)."""
    out: list[Tensor] = []
    for inner in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        torch_optimizer = getattr(inner, "optimizer", None)
        if torch_optimizer is None:
            continue
        for group in torch_optimizer.param_groups:
            out += [p.data for p in group["params"]]
        for state in torch_optimizer.state.values():
            out += [v for v in state.values() if isinstance(v, Tensor)]
    return out
