"""How buckets of HF-named tensors reach the engine: one class per transport, chosen by a dict.

| transport      | engine                       | what crosses                                   | runs on |
|----------------|------------------------------|------------------------------------------------|---------|
| `disk`         | any (`update_weights_from_disk`) | a HF safetensors directory (disk.py)        | CPU/GPU |
| `buckets`      | in-process (`LocalEngine`)   | the bucket tensors themselves, in memory       | CPU/GPU |
| `tensor`       | colocated SGLang server      | CUDA IPC handles of the bucket tensors         | GPU     |
| `distributed`  | SGLang server on other GPUs  | NCCL broadcasts in a trainer + server group    | GPU     |

`sync.transport` names what the user wants; `ROUTES` maps it, with the kind of engine, to one
of the classes above: an in-process engine lives in the learner's process, so for it `disk` and
`tensor` both hand the buckets over in memory (`buckets`: exporter -> HF names -> buckets ->
`update_weights_from_tensors`, the path SGLang's tensor update takes). `WeightSync(...,
transport="disk")` forces real files for an in-process engine (tests, benchmarks).

Every transport runs on the driver rank only and has `push(buckets, version) -> PushStats`.
Transports with `flat = True` consume each bucket before asking for the next (they get the
exporter's reused buffer); the others look one bucket ahead to flush the engine's cache on the
last one only, and get independent buckets.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import socket
import time
from collections.abc import Iterable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from megatron_s2lpo.config.sync import SyncConfig

from .base import PushStats, TransportContext
from .disk import DiskTransport
from .exporter import Bucket, bucket_bytes, with_last

# Rendezvous and collectives of the trainer + server group give up after this long.
GROUP_TIMEOUT = datetime.timedelta(minutes=10)


def engine_kind(engine: Any) -> str:
    """`server` for an engine behind SGLang's HTTP API (it has get_model_info), else `in_process`."""
    return "server" if callable(getattr(engine, "get_model_info", None)) else "in_process"


def describe_engine(engine: Any) -> str:
    """A name for error messages: class, name / model id, URL."""
    parts = [type(engine).__name__]
    for attr in ("name", "model_id", "url"):
        value = getattr(engine, attr, None)
        if isinstance(value, str) and value:
            parts.append(f"{attr}={value}")
    return " ".join(parts)


def _push_tensor_buckets(engine: Any, buckets: Iterable[Bucket], version: int) -> PushStats:
    """update_weights_from_tensors per bucket; the engine's cache is flushed after the last one."""
    num_bytes = num_buckets = 0
    for bucket, last in with_last(buckets):
        engine.update_weights_from_tensors(bucket, version, flush=last)
        num_bytes += bucket_bytes(bucket)
        num_buckets += 1
    return PushStats(num_bytes=num_bytes, num_buckets=num_buckets)


class BucketTransport:
    """In-process engine: each bucket's tensors are copied straight into the engine's model."""

    name = "buckets"
    flat = False

    def __init__(self, engine: Any, config: SyncConfig, context: TransportContext) -> None:
        self.engine = engine

    def push(self, buckets: Iterable[Bucket], version: int) -> PushStats:
        return _push_tensor_buckets(self.engine, buckets, version)

    def close(self) -> None:
        pass


def _require_cuda_and_sglang(transport: str, *, need_sglang: bool) -> None:
    missing = []
    if not torch.cuda.is_available():
        missing.append("CUDA")
    if need_sglang and importlib.util.find_spec("sglang") is None:
        missing.append("the sglang package in the trainer's environment")
    if missing:
        raise ValueError(
            f"sync.transport={transport} needs CUDA and SGLang (missing here: {', '.join(missing)}); "
            "on a machine without them use sync.transport=disk")


class TensorTransport:
    """Colocated SGLang server (same GPUs): CUDA IPC handles, one payload per bucket.

    SGLang's `monkey_patch_torch_reductions` (imported lazily) makes the pickled handles name
    the GPU by UUID instead of by index, so a server process whose CUDA_VISIBLE_DEVICES numbers
    the GPUs differently still opens the right memory. The engine then serializes each bucket
    exactly as SGLang's `MultiprocessingSerializer.serialize(named_tensors, output_str=True)`
    does (ForkingPickler, base64) and posts it to /update_weights_from_tensor; the call returns
    once the server has copied the weights, so the bucket can be freed.
    """

    name = "tensor"
    flat = False
    trainer_needs = ("cuda", "sglang")  # what the trainer's environment must provide (see trainer_needs())

    def __init__(self, engine: Any, config: SyncConfig, context: TransportContext, *,
                 check_environment: bool = True) -> None:
        if check_environment:  # tests pass False to check the call sequence on CPU
            _require_cuda_and_sglang(self.name, need_sglang="sglang" in self.trainer_needs)
            from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions

            monkey_patch_torch_reductions()
        self.engine = engine

    def push(self, buckets: Iterable[Bucket], version: int) -> PushStats:
        return _push_tensor_buckets(self.engine, buckets, version)

    def close(self) -> None:
        pass


def init_custom_group(backend: str, master_address: str, master_port: int, world_size: int, rank: int,
                      group_name: str, timeout: datetime.timedelta = GROUP_TIMEOUT) -> Any:
    """A process group outside the default world (the trainer + an SGLang server's ranks).

    The same construction as SGLang's `init_custom_process_group` (which the server runs for
    its side): TCP rendezvous (rank 0 hosts the store), a store prefixed with the group name,
    and the group registered with ranks mapped to themselves so `dist.broadcast(src=0)` works.
    """
    from torch.distributed.distributed_c10d import (Backend, PrefixStore, _new_process_group_helper,
                                                    _world, rendezvous)

    url = f"tcp://{master_address}:{master_port}"
    store, rank, world_size = next(rendezvous(url, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    group, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), store,
                                         group_name=group_name, timeout=timeout)
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def address_towards(url: str) -> str:
    """This host's address on the route to `url`'s host (no packet is sent)."""
    parsed = urlparse(url)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((parsed.hostname or "127.0.0.1", parsed.port or 80))
        return sock.getsockname()[0]


class DistributedTransport:
    """SGLang server on other GPUs: NCCL broadcasts from the trainer (rank 0 of a new group).

    Once: POST /init_weights_update_group (master address / port, rank_offset 1, world size
    1 + server TP, a group name unique to this sync object, backend) while this process joins
    the same rendezvous as rank 0. Per bucket: POST /update_weights_from_distributed {names,
    dtypes, shapes, group_name, flush_cache, weight_version} runs in a worker thread; the server
    posts one receive per name, in order, and this thread broadcasts each tensor in that order
    (asynchronously, then waits for the server's answer: a refused bucket raises, not hangs).
    """

    name = "distributed"
    flat = False
    trainer_needs = ("cuda",)

    def __init__(self, engine: Any, config: SyncConfig, context: TransportContext, *,
                 backend: str = "nccl", check_environment: bool = True) -> None:
        if check_environment:  # tests pass False (and backend="gloo") to run it on CPU
            _require_cuda_and_sglang(self.name, need_sglang="sglang" in self.trainer_needs)
        server = getattr(engine, "cfg", None)
        if server is None or not hasattr(engine, "init_weights_update_group"):
            raise ValueError(f"sync.transport=distributed needs an SGLang engine, got {describe_engine(engine)}")
        if server.dp_size != 1:
            raise ValueError(
                f"sync.transport=distributed: the server at {engine.url} runs dp_size={server.dp_size}, "
                "and SGLang 0.5.23 refuses NCCL weight updates with data-parallel replicas; launch "
                "one server per replica (dp_size=1) or use sync.transport=disk")
        self.engine = engine
        self.backend = backend
        self.world_size = 1 + server.tp_size * server.dp_size
        self.master_address = config.master_address
        self.master_port = config.master_port
        self.group_name = f"s2lpo_weight_sync_{os.getpid()}_{time.time_ns()}"
        self.group: Any = None
        self._broken = False
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="weight-sync")

    def _connect(self) -> None:
        """Create the trainer + server group: both sides join the rendezvous concurrently."""
        address = self.master_address or address_towards(self.engine.url)
        port = self.master_port or free_port()
        call = self._pool.submit(
            self.engine.init_weights_update_group, master_address=address, master_port=port,
            rank_offset=1, world_size=self.world_size, group_name=self.group_name, backend=self.backend)
        joined = self._pool.submit(init_custom_group, self.backend, address, port, self.world_size, 0,
                                   self.group_name)
        wait([call, joined], return_when=FIRST_EXCEPTION)  # both done, or one failed
        for future in (call, joined):  # a server that refuses never joins: fail now, not at the timeout
            if future.done() and future.exception() is not None:
                self._broken = True
                raise future.exception()
        self.group = joined.result()

    def push(self, buckets: Iterable[Bucket], version: int) -> PushStats:
        if self._broken:
            raise RuntimeError(f"the weight-update group with {self.engine.url} broke in an earlier failed "
                               "push; restart the server and build a new WeightSync")
        if self.group is None:
            self._connect()
        num_bytes = num_buckets = 0
        for bucket, last in with_last(buckets):
            call: Future = self._pool.submit(
                self.engine.update_weights_from_distributed,
                names=[name for name, _ in bucket],
                dtypes=[str(t.dtype).removeprefix("torch.") for _, t in bucket],
                shapes=[list(t.shape) for _, t in bucket],
                version=version, group_name=self.group_name, flush=last)
            # Asynchronous: if the server refuses the bucket (it then posts no receives), the
            # error of its HTTP answer surfaces here instead of a broadcast waiting forever.
            works = [dist.broadcast(tensor, src=0, group=self.group, async_op=True) for _, tensor in bucket]
            try:
                call.result()
            except BaseException:
                self._broken = True  # unmatched broadcasts are pending in the group
                raise
            for work in works:
                work.wait()
            num_bytes += bucket_bytes(bucket)
            num_buckets += 1
        return PushStats(num_bytes=num_bytes, num_buckets=num_buckets)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        if self.group is not None and not self._broken:  # a broken group may hang in teardown
            dist.destroy_process_group(self.group)
        self.group = None


TRANSPORTS: dict[str, type] = {
    "disk": DiskTransport,
    "buckets": BucketTransport,
    "tensor": TensorTransport,
    "distributed": DistributedTransport,
}

# (sync.transport, engine kind) -> TRANSPORTS key
ROUTES: dict[tuple[str, str], str] = {
    ("disk", "server"): "disk",
    ("disk", "in_process"): "buckets",
    ("tensor", "server"): "tensor",
    ("tensor", "in_process"): "buckets",
    ("distributed", "server"): "distributed",
}


def route(transport: str, engine: Any) -> str:
    """The TRANSPORTS key for `sync.transport` and this engine (ValueError if none fits)."""
    key = ROUTES.get((transport, engine_kind(engine)))
    if key is None:
        raise ValueError(f"sync.transport={transport!r} needs an SGLang server as the learner's engine, "
                         f"got the in-process {describe_engine(engine)}; use sync.transport=disk")
    return key


def trainer_needs(transport: str, kind: str = "server") -> tuple[str, ...]:
    """What `sync.transport` with this kind of engine needs in the trainer's own environment:
    a subset of ("cuda", "sglang"), read from the transport class (the launcher checks a layout
    against it before submitting a job)."""
    key = ROUTES.get((transport, kind))
    return tuple(getattr(TRANSPORTS[key], "trainer_needs", ())) if key is not None else ()


def build_transport(name: str, engine: Any, config: SyncConfig, context: TransportContext) -> Any:
    if name not in TRANSPORTS:
        raise ValueError(f"unknown weight-sync transport {name!r}; choose one of {sorted(TRANSPORTS)}")
    return TRANSPORTS[name](engine, config, context)
