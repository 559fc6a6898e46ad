"""How buckets of HF-named tensors reach the engine: one class per transport, chosen by a dict.

| transport      | engine                       | what crosses                                   | runs on |
|----------------|------------------------------|------------------------------------------------|---------|
| `disk`         | any (`update_weights_from_disk`) | a HF safetensors directory (disk.py)        | CPU/GPU |
| `buckets`      | in-process (`LocalEngine`)   | the bucket tensors themselves, in memory       | CPU/GPU |
| `tensor`       | colocated SGLang servers     | CUDA IPC handles of one flattened bucket       | GPU     |
| `distributed`  | SGLang servers on other GPUs | one broadcast per bucket in ONE group over the trainer and every replica (distributed.py) | GPU (gloo: CPU) |

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

import socket
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlparse

import torch

from megatron_s2lpo.config.sync import SyncConfig

from .base import PushStats, TransportContext
from .disk import DiskTransport
from .distributed import DistributedTransport, init_custom_group  # noqa: F401 - re-exported
from .exporter import Bucket, bucket_bytes, with_last


def engine_kind(engine: Any) -> str:
    """`server` for an engine behind SGLang's HTTP API (it has get_model_info), else `in_process`."""
    return "server" if callable(getattr(engine, "get_model_info", None)) else "in_process"


def describe_engine(engine: Any) -> str:
    """A name for error messages: class, name / model id, URL (one replica: "replica NAME at URL")."""
    if getattr(engine, "replica", None) is not None:
        return f"SGLang replica {engine.name} at {engine.url}"
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


def require_cuda(transport: str, instead: str) -> None:
    if not torch.cuda.is_available():
        raise ValueError(f"sync.transport={transport} needs CUDA (missing here); on a machine without it use "
                         f"{instead}")


class TensorTransport:
    """Colocated SGLang servers (same GPUs): CUDA IPC handles, one flattened bucket per push step.

    The whole push is one weight-update session on every replica (`weight_update_session`:
    generation paused, /begin_weight_update, buckets, /end_weight_update). Per bucket the engine
    packs the tensors into one flat buffer and posts, to every replica, one payload per server TP
    rank serialized the way SGLang's `Engine._serialize_tensors_per_rank` does, with the GPU
    named by UUID (rollout/sglang_tensors.py: the trainer needs no SGLang import). The call
    returns once every server has copied the weights, so the buffer can then be freed.
    """

    name = "tensor"
    flat = False
    # What the trainer's environment must provide (see trainer_needs()): the serializer is the
    # trainer's own (rollout/sglang_tensors.py), so SGLang need not be installed beside it.
    trainer_needs = ("cuda",)

    def __init__(self, engine: Any, config: SyncConfig, context: TransportContext, *,
                 check_environment: bool = True, cpu_sharing: str | None = None) -> None:
        if check_environment:  # tests pass False (and cpu_sharing="file_system") to run it on CPU
            require_cuda("tensor", "sync.transport=disk")
        if not hasattr(engine, "weight_update_session"):
            raise ValueError(f"sync.transport=tensor needs an SGLang engine, got {describe_engine(engine)}")
        self.engine = engine
        self.cpu_sharing = cpu_sharing

    def push(self, buckets: Iterable[Bucket], version: int) -> PushStats:
        num_bytes = num_buckets = 0
        with self.engine.weight_update_session(version):
            for bucket, last in with_last(buckets):
                self.engine.update_weights_from_tensors(bucket, version, flush=last, cpu_sharing=self.cpu_sharing)
                num_bytes += bucket_bytes(bucket)
                num_buckets += 1
        return PushStats(num_bytes=num_bytes, num_buckets=num_buckets)

    def close(self) -> None:
        pass


def address_towards(url: str) -> str:
    """This host's address on the route to `url`'s host (no packet is sent)."""
    parsed = urlparse(url)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((parsed.hostname or "127.0.0.1", parsed.port or 80))
        return sock.getsockname()[0]


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
