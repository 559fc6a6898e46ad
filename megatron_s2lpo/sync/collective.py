"""Run a step on the driver rank (global rank 0) and give every learner rank its outcome.

Weight sync and the parity check talk to the rollout engine from one rank only, but every rank
must leave the step the same way: with the same result, or with the same error. Otherwise a
rank that saw the engine fail raises while the others wait forever in their next collective.
`run_on_driver` catches the driver's exception, broadcasts (result | error) over the default
process group, and raises on every rank.
"""

from __future__ import annotations

import pickle
from typing import Any, Callable, TypeVar

import torch.distributed as dist

T = TypeVar("T")
DRIVER_RANK = 0


def _world(groups: Any) -> int:
    return groups.world_size if dist.is_initialized() else 1


def broadcast_from_driver(obj: Any, groups: Any) -> Any:
    """`obj` of the driver rank on every rank (the others pass anything, e.g. None)."""
    if _world(groups) == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=DRIVER_RANK)
    return holder[0]


def _portable_error(err: BaseException) -> tuple[type, str]:
    """(exception class, message), the class replaced by RuntimeError if it cannot travel."""
    cls = type(err)
    try:
        pickle.loads(pickle.dumps(cls))
        cls(str(err))  # rebuildable from its message alone
    except Exception:  # noqa: BLE001 - any failure means: send a plain RuntimeError
        return RuntimeError, f"{cls.__name__}: {err}"
    return cls, str(err)


def run_on_driver(fn: Callable[[], T], groups: Any) -> T:
    """fn() on the driver rank; every rank returns its result or raises its exception.

    The driver re-raises the original exception (with its traceback); the other ranks raise
    the same exception class with the same message, marked as raised on rank 0.
    """
    result: Any = None
    error: BaseException | None = None
    if groups.rank == DRIVER_RANK:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - shared with the other ranks, then re-raised
            error = err
    payload = ("error", *_portable_error(error)) if error is not None else ("ok", result)
    shared = broadcast_from_driver(payload, groups)
    if error is not None:
        raise error
    if shared[0] == "error":
        _, cls, message = shared
        raise cls(f"{message} [raised on learner rank {DRIVER_RANK}]")
    return shared[1]
