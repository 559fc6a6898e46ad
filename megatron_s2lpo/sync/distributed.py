"""Distributed transport: ONE update group over the trainer and every replica, one broadcast per bucket.

The group (SGLang 0.5.23 `model_runner_components/weight_updater.py::init_weights_update_group`,
the construction slime and verl use for many replicas):

    rank 0                       the trainer (global learner rank 0)
    rank 1 + sum(tp_j, j < i)    replica i's TP rank 0 (`rank_offset` of replica i), then its other TP ranks
    world size                   1 + sum of every replica's tp_size

`/init_weights_update_group` goes to every replica at once while the trainer joins the same TCP
rendezvous as rank 0 (`init_custom_group`). The transport takes the exporter's flat buckets (one
reused buffer): a bucket already back to back is broadcast from that buffer as it is; otherwise
it is copied into SGLang's flattened layout (rollout/sglang_tensors.py; two reused buffers, so
the copy of bucket k + 1 overlaps the broadcast of bucket k). `/update_weights_from_distributed` {names, dtypes,
shapes, group_name, flush_cache, weight_version, load_format: "flattened_bucket"} goes to every
replica at once (each posts ONE receive into `FlattenedTensorBucket.empty(...)`), and the trainer
posts one broadcast of the packed bytes (src 0), which serves every replica. The whole push is
one weight-update session per replica (`SGLangEngine.weight_update_session`: begin, buckets,
end), generation paused.

A replica that refuses a bucket posts no receive, and the others wait for a broadcast that cannot
complete: the trainer stops waiting as soon as one replica's answer is a refusal, ends every
session (bounded), marks the group broken (the next push rebuilds it under a new name instead of
reusing half-finished collectives), aborts it where the backend can (NCCL), and raises the
refusal. Every collective of the group gives up after `sync.group_timeout_s`. A replica that was
restarted (a new process) has left the group; the next push notices and rebuilds it.

SGLang 0.5.23 refuses NCCL updates for servers with dp_size > 1 (`tokenizer_control_mixin.py`):
the transport refuses them too and points to `replicas`.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections.abc import Iterable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any

import torch
import torch.distributed as dist

from megatron_s2lpo.config.sync import SyncConfig
from megatron_s2lpo.utils.ports import free_port

from .base import PushStats, TransportContext
from .exporter import Bucket, bucket_bytes

logger = logging.getLogger(__name__)


def init_custom_group(backend: str, master_address: str, master_port: int, world_size: int, rank: int,
                      group_name: str, timeout: datetime.timedelta = datetime.timedelta(minutes=10)) -> Any:
    """A process group outside the default world (the trainer + the servers' ranks).

    The same construction as SGLang's `init_custom_process_group` (`utils/common.py`, which the
    servers run for their side): TCP rendezvous (rank 0 hosts the store), a store prefixed with the
    group name, and the group registered with ranks mapped to themselves so `broadcast(src=0)` works.
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


def group_layout(tp_sizes: list[int]) -> tuple[list[int], int]:
    """(rank_offset of each replica, world size) of one group over the trainer and the replicas."""
    offsets, next_rank = [], 1
    for tp in tp_sizes:
        offsets.append(next_rank)
        next_rank += tp
    return offsets, next_rank


class DistributedTransport:
    """SGLang servers on other GPUs: one group, one broadcast per bucket reaches every replica."""

    name = "distributed"
    flat = True  # each bucket is on the wire (or copied) before the next is exported
    trainer_needs = ("cuda",)  # what the trainer's environment must provide (transports.trainer_needs)

    def __init__(self, engine: Any, config: SyncConfig, context: TransportContext, *,
                 check_environment: bool = True) -> None:
        from .transports import address_towards, describe_engine, require_cuda

        self.backend = config.group_backend
        if check_environment and self.backend == "nccl":  # gloo moves CPU tensors (tests, benchmark)
            require_cuda("distributed", "sync.group_backend=gloo moves CPU tensors, sync.transport=disk")
        if not hasattr(engine, "submit_update_weights_from_distributed"):
            raise ValueError(f"sync.transport=distributed needs an SGLang engine, got {describe_engine(engine)}")
        self.engine = engine
        self.config = config
        self.timeout = datetime.timedelta(seconds=config.group_timeout_s)
        self.master_address = config.master_address or address_towards(engine.url)
        self._check_replicas()
        self.group: Any = None
        self.group_name = ""
        self.members: list[tuple[Any, int]] = []  # (replica, its num_starts) the group was built with
        self._broken = False
        self._packs: Any = None  # two packed-bucket buffers, kept between syncs
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="weight-sync")

    def _check_replicas(self) -> None:
        cfg = self.engine.cfg
        for replica in self.engine.replicas:
            dp = replica.dp_size or cfg.dp_size
            if dp != 1:
                raise ValueError(
                    f"sync.transport=distributed: {replica.describe()} runs dp_size={dp}, and SGLang 0.5.23 "
                    "refuses NCCL weight updates with data-parallel replicas inside one server; run one server "
                    "per replica instead (rollout.learner.replicas: N with dp_size 1), or use sync.transport=disk")
            if replica.tp_size is not None and replica.tp_size != cfg.tp_size:
                raise ValueError(
                    f"sync.transport=distributed: {replica.describe()} runs tp_size={replica.tp_size}, but the "
                    f"update group gives every replica rollout.learner.tp_size={cfg.tp_size} ranks; launch every "
                    "replica with that TP size or set tp_size to what the servers run")

    # ----- the group -----

    def _connect(self) -> None:
        """One group over the trainer and every live replica: all join the rendezvous at once."""
        replicas = self.engine.live_replicas()
        if not replicas:
            raise RuntimeError(f"no replica of {self.engine.name} is up to join the weight-update group")
        offsets, world_size = group_layout([self.engine.cfg.tp_size] * len(replicas))
        port = self.config.master_port or free_port("")  # the trainer hosts the group
        self.group_name = f"s2lpo_weight_sync_{os.getpid()}_{time.time_ns()}"
        calls = [self.engine.submit_init_weights_update_group(
            r, master_address=self.master_address, master_port=port, rank_offset=offset, world_size=world_size,
            group_name=self.group_name, backend=self.backend) for r, offset in zip(replicas, offsets)]
        joined = self._pool.submit(init_custom_group, self.backend, self.master_address, port, world_size, 0,
                                   self.group_name, self.timeout)
        done, _ = wait([*calls, joined], return_when=FIRST_EXCEPTION, timeout=self.config.group_timeout_s)
        for replica, call in zip(replicas, calls):  # a replica that refuses never joins: fail now
            if call.done() and call.exception() is not None:
                self._abandon()
                raise RuntimeError(f"{replica.describe()} refused to join the weight-update group "
                                   f"{self.group_name}: {call.exception()}") from None
        if not joined.done() or joined.exception() is not None:
            self._abandon()
            raise RuntimeError(f"the weight-update group {self.group_name} with {len(replicas)} replica(s) did "
                               f"not form within sync.group_timeout_s={self.config.group_timeout_s:g} s: "
                               f"{joined.exception() if joined.done() else 'rendezvous timed out'}")
        self.group = joined.result()
        self.members = [(r, r.num_starts) for r in replicas]
        self._broken = False

    def _membership_changed(self) -> bool:
        live = self.engine.live_replicas()
        return [id(r) for r in live] != [id(r) for r, _ in self.members] or any(
            r.num_starts != starts for r, starts in self.members)

    def _abandon(self) -> None:
        """Leave a broken group without waiting on its pending collectives."""
        group, self.group = self.group, None
        self._broken = False
        self._packs = None  # a pending broadcast may still read the old buffers
        if group is not None and self.backend == "nccl":
            try:
                from torch.distributed.distributed_c10d import _abort_process_group

                _abort_process_group(group)
            except Exception as err:  # noqa: BLE001 - best effort; the process may still exit
                logger.warning("could not abort the broken weight-update group: %s", err)
        # gloo: destroying would wait for the pending broadcast until the timeout; dropping it does not.

    # ----- push -----

    def push(self, buckets: Iterable[Bucket], version: int) -> PushStats:
        if self._broken or (self.group is not None and self._membership_changed()):
            if self.group is not None and not self._broken:
                self.engine.destroy_weights_update_group(self.group_name)
            self._abandon()
        if self.group is None:
            self._connect()
        if self._packs is None:
            from megatron_s2lpo.rollout.sglang_tensors import PackBuffer

            self._packs = (PackBuffer(), PackBuffer())
        num_bytes = num_buckets = 0
        pending = None
        with self.engine.weight_update_session(version):
            try:
                for index, bucket in enumerate(buckets):
                    flat, metadata = self._pack(bucket, index)
                    copied = flat.untyped_storage().data_ptr() != bucket[0][1].untyped_storage().data_ptr()
                    if pending is not None:  # a copy could overlap the previous broadcast; a view cannot
                        self._finish(pending)
                    pending = self._send(flat, metadata, version)
                    num_bytes += bucket_bytes(bucket)
                    num_buckets += 1
                    if not copied:  # the exporter reuses its buffer for the next bucket
                        self._finish(pending)
                        pending = None
                if pending is not None:
                    self._finish(pending)
            except BaseException:
                self._broken = True  # a broadcast some replica never receives may be pending
                raise
        return PushStats(num_bytes=num_bytes, num_buckets=num_buckets)

    def _pack(self, bucket: Bucket, index: int) -> tuple[torch.Tensor, list]:
        """Bucket `index` in SGLang's flattened layout, in one of two reused buffers (the other
        may still be on the wire)."""
        from megatron_s2lpo.rollout.sglang_tensors import pack_bucket

        return pack_bucket(bucket, buffer=self._packs[index % 2])

    def _send(self, flat: torch.Tensor, metadata: list, version: int) -> tuple[Any, Any]:
        """Announce the bucket to every replica and post its one broadcast (both asynchronous).

        Every bucket flushes the server's cache (flush_cache=true): buckets are consumed as they
        come, so the last one is not known in advance, and flushing an already flushed, idle
        cache costs nothing (generation is paused)."""
        from megatron_s2lpo.rollout.sglang_tensors import FLATTENED_BUCKET, check_flattened

        check_flattened(flat, metadata)  # the announced sizes are the receive buffer of the broadcast
        answers = self.engine.submit_update_weights_from_distributed(
            [r for r, _ in self.members], names=[m.name for m in metadata],
            dtypes=[str(m.dtype).removeprefix("torch.") for m in metadata], shapes=[list(m.shape) for m in metadata],
            group_name=self.group_name, flush_cache=True, weight_version=str(version), load_format=FLATTENED_BUCKET)
        return answers, dist.broadcast(flat, src=0, group=self.group, async_op=True)

    def _finish(self, pending: tuple[Any, Any]) -> None:
        answers, work = pending
        answers.result(timeout=self.config.group_timeout_s)  # a refusal arrives at once
        work.wait()

    def close(self) -> None:
        """/destroy_weights_update_group on every replica, then the trainer's side of the group."""
        self._pool.shutdown(wait=False)
        if self.group is None:
            return
        if self._broken:
            self._abandon()
            return
        self.engine.destroy_weights_update_group(self.group_name, [r for r, _ in self.members])
        dist.destroy_process_group(self.group)
        self.group = None
