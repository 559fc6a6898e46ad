"""The protocol test server's weight-update side: SGLang 0.5.23's rules over a LocalEngine.

Followed from SGLang 0.5.23 (read in the wheel):
  - sessions (`managers/scheduler_components/weight_updater.py`, SchedulerWeightUpdaterManager):
    /update_weights_from_tensor and /update_weights_from_distributed answer success=false outside
    a /begin_weight_update ... /end_weight_update session ("must run between begin_weight_update()
    and end_weight_update()"); a second begin is refused ("a weight-update session is already
    open"), an end without a begin too ("no weight-update session is open"); the HTTP layer
    (`entrypoints/http_server.py`) turns success=false into 400;
  - an update with flush_cache=true fails while requests are running or queued ("Weights were
    updated, but the cache was not flushed ...", `flush_cache_after_weight_update`): pause first;
  - the update group (`model_runner_components/weight_updater.py`): the server's rank is
    rank_offset + tp_rank in a group made by `init_custom_process_group` (TCP rendezvous, store
    prefixed with the group name); a bucket with load_format="flattened_bucket" is ONE broadcast
    from rank 0 into `FlattenedTensorBucket.empty(names, dtypes, shapes)` (bytes back to back,
    offsets aligned to the dtype size), otherwise one broadcast per name in order; an unknown
    group name fails the receive ("Failed to receive weights"); the weight version is recorded
    after a successful load;
  - /destroy_weights_update_group of an unknown group answers success=false.
One process plays every TP rank only for tp_size 1: a server started with --tp-size > 1 reports
it (/server_info) but refuses to join an update group.
"""

from __future__ import annotations

import datetime
import math
import threading
from typing import Any, Callable

GROUP_TIMEOUT = datetime.timedelta(minutes=10)


class ProtocolWeights:
    """Session state, update group and loads of one server. Methods return (success, message)."""

    def __init__(self, engine: Any, *, tp_size: int, is_idle: Callable[[], bool],
                 set_version: Callable[[str | None], None]) -> None:
        self.engine = engine  # LocalEngine, None in --noop mode
        self.tp_size = tp_size
        self.is_idle = is_idle
        self.set_version = set_version
        self.session_open = False
        self.refuse_next = 0  # fault injection: refuse that many distributed buckets (no receive posted)
        self.groups: dict[str, Any] = {}
        self.lock = threading.Lock()  # handlers run in worker threads

    # ----- sessions -----

    def begin(self, body: dict) -> tuple[bool, str]:
        with self.lock:
            if self.session_open:
                return False, "a weight-update session is already open; call end_weight_update() first"
            self.session_open = True
            return True, "Success"

    def end(self, body: dict) -> tuple[bool, str]:
        with self.lock:
            if not self.session_open:
                return False, "no weight-update session is open; call begin_weight_update() first"
            self.session_open = False
            return True, "Success"

    def _after_load(self, body: dict, message: str) -> tuple[bool, str]:
        self.set_version(body.get("weight_version"))
        if body.get("flush_cache", True) and not self.is_idle():
            return False, ("Weights were updated, but the cache was not flushed because requests are still "
                           "running or queued. Retract or finish them, then call /flush_cache.")
        return True, message

    # ----- tensor route -----

    def update_from_tensor(self, body: dict) -> tuple[bool, str]:
        if not self.session_open:
            return False, "update_weights_from_tensor must run between begin_weight_update() and end_weight_update()"
        return False, ("update_weights_from_tensor is unavailable on the protocol test server (CUDA IPC handles "
                       "need CUDA; the contract server runs SGLang's own loader)")

    # ----- update group -----

    def init_group(self, body: dict) -> tuple[bool, str]:
        if self.tp_size != 1:
            return False, (f"the protocol test server plays one rank; it was started with --tp-size {self.tp_size} "
                           "and cannot join an update group")
        try:
            from megatron_s2lpo.sync.transports import init_custom_group

            group = init_custom_group(body.get("backend", "nccl"), body["master_address"], int(body["master_port"]),
                                      int(body["world_size"]), int(body["rank_offset"]) + 0,
                                      body.get("group_name", "weight_update_group"), timeout=GROUP_TIMEOUT)
        except Exception as err:  # noqa: BLE001 - reported like SGLang's WeightUpdater
            return False, f"Failed to initialize custom process group: {err}."
        self.groups[body.get("group_name", "weight_update_group")] = group
        return True, "Succeeded to initialize custom process group."

    def destroy_group(self, body: dict) -> tuple[bool, str]:
        import torch.distributed as dist

        group = self.groups.pop(body.get("group_name", "weight_update_group"), None)
        if group is None:
            return False, "The group to be destroyed does not exist."
        dist.destroy_process_group(group)
        return True, "Succeeded to destroy custom process group."

    def update_from_distributed(self, body: dict) -> tuple[bool, str]:
        if not self.session_open:
            return False, ("update_weights_from_distributed must run between begin_weight_update() and "
                           "end_weight_update()")
        if self.refuse_next > 0:
            self.refuse_next -= 1
            return False, "Failed to update parameter online: refused by fault injection (no receive posted)"
        name = body.get("group_name", "weight_update_group")
        if name not in self.groups:
            return False, f"Failed to receive weights: Group {name} not in {list(self.groups)}."
        try:
            named = _receive(self.groups[name], body)
        except Exception as err:  # noqa: BLE001
            return False, f"Failed to receive weights: {err}"
        try:
            if self.engine is not None:
                self.engine.update_weights_from_tensors(named, version=self.engine.weight_version, flush=False)
        except Exception as err:  # noqa: BLE001
            return False, (f"Failed to update parameter online: {err}. The full weights of the ModelRunner are "
                           "partially updated. Please discard the whole weights.")
        return self._after_load(body, "Succeeded to update parameter online.")


def _receive(group: Any, body: dict) -> list:
    """The receive side of one bucket, as SGLang's WeightUpdater posts it."""
    import torch
    import torch.distributed as dist

    names, dtypes, shapes = body["names"], body["dtypes"], body["shapes"]
    if body.get("load_format") == "flattened_bucket":
        metadata, offset = [], 0
        for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
            dtype = getattr(torch, dtype)
            if any(d < 0 for d in shape):
                raise ValueError(f"Negative dimension in received tensor {name}: {shape}")
            if offset % dtype.itemsize:
                raise ValueError(f"Unaligned received tensor {name}: byte offset {offset}, dtype {dtype}")
            size = math.prod(shape) * dtype.itemsize
            metadata.append((name, dtype, shape, offset, size))
            offset += size
        if not metadata:
            raise ValueError("Cannot create empty tensor bucket")
        flat = torch.empty(offset, dtype=torch.uint8)
        dist.broadcast(flat, src=0, group=group)
        return [(name, flat[start:start + size].view(dtype).reshape(shape))
                for name, dtype, shape, start, size in metadata]
    received, handles = [], []
    for name, dtype, shape in zip(names, dtypes, shapes):
        tensor = torch.empty(shape, dtype=getattr(torch, dtype))
        handles.append(dist.broadcast(tensor, src=0, group=group, async_op=True))
        received.append((name, tensor))
    for handle in handles:
        handle.wait()
    return received
