"""Measured peak of the memory a piece of code allocates on the CPU (for checking the planner).

There is no `torch.cuda.max_memory_allocated` for host memory, so the measurement uses torch's
own allocator accounting: with `torch.profiler.profile(profile_memory=True)` every allocation and
free that goes through c10's CPU allocator (every tensor storage: forward activations, what
autograd saves, gradients, optimizer state, gloo's tensors) is recorded as a `[memory]` event
with its size (negative for a free) and time. Sorting those by time and taking the running sum
gives the bytes live at every moment relative to the start; its maximum is the peak of `fn`.
Memory allocated before the call (weights, buffers) is added by the caller (`storage_bytes`).
The profiler records Python-level frees too (a tensor dropped by refcount), so the curve is the
allocator's, not an estimate. Allocations outside c10 (Python objects, the interpreter, numpy)
are not counted: the planner does not model them either.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


def peak_allocated_bytes(fn: Callable[[], Any]) -> tuple[int, Any]:
    """(peak bytes allocated on the CPU while `fn()` ran, above what was live before; its result)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, result


def storage_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one buffer count once)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor):
            storage = tensor.untyped_storage()
            if storage.nbytes():
                seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
