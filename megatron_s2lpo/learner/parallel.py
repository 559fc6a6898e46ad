"""Process groups of the learner: torch.distributed + megatron parallel_state + RNG.

`init_parallel` is the only place that touches megatron's global parallel state. It returns a
`ParallelGroups` that every other learner helper receives as an argument, so no helper calls a
global getter (and nothing does at import time).

Layout (megatron's default order tp-cp-ep-dp-pp): with world size W, TP size t, CP size c and
PP size p, ranks [0, t) form the first TP group, DP size is W / (t * c * p), and the pipeline
stages are the slowest-varying dimension. With 2 processes: TP=2 -> one TP group {0, 1}; PP=2 ->
one pipeline {0 (first stage), 1 (last stage)}; CP=2 -> one context-parallel group; none -> DP=2.
Experts (mixture-of-experts models) have a grid of their own over the same ranks (order
tp-ep-dp-pp with the expert-TP size e_t and expert-parallel size e): expert-parallel ranks are
carved out of the data-parallel ones, so with 2 processes EP=2 means DP=2 for every dense weight
and each rank holding half the experts.
"""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .cpu_shims import apply_cpu_shims
from ..utils.ports import free_port

_OWNS_PROCESS_GROUP = False  # whether init_parallel created the default process group


@dataclass(kw_only=True, slots=True)
class ParallelGroups:
    """This rank's process groups and coordinates in the TP x PP x DP grid."""

    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    dp_group_gloo: dist.ProcessGroup | None  # gloo twin of dp_group (host-side exchanges)
    embedding_group: dist.ProcessGroup | None  # first + last pipeline stage (tied embeddings)
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    vpp_size: int | None  # virtual pipeline stages per rank; None without interleaving
    rank: int
    world_size: int
    device: torch.device
    cp_size: int = 1  # context-parallel ranks per sequence (1: none)
    cp_rank: int = 0
    cp_group: dist.ProcessGroup | None = None
    ep_size: int = 1  # expert-parallel ranks (each holds num_experts / ep_size experts)
    ep_rank: int = 0
    ep_group: dist.ProcessGroup | None = None
    etp_size: int = 1  # expert tensor-parallel ranks (each expert's weights split over them)
    etp_rank: int = 0
    etp_group: dist.ProcessGroup | None = None

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def _init_process_group(backend: str, timeout_minutes: int) -> None:
    """torch.distributed from the torchrun env (RANK, WORLD_SIZE, MASTER_ADDR/PORT) or a 1-rank world."""
    global _OWNS_PROCESS_GROUP
    if dist.is_initialized():
        return
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{free_port()}",
                                rank=0, world_size=1, timeout=timeout)
    _OWNS_PROCESS_GROUP = True


def seed_everything(seed: int, pp_rank: int) -> None:
    """Seed python/numpy/torch and megatron's RNG tracker like megatron's own trainer.

    The host seed is the same on every TP and DP rank (CPU initialisation draws the full
    weight on each TP rank and keeps a slice, and DP replicas must start equal) and differs per
    pipeline stage (other layers). Without CUDA megatron's no-op "inference" tracker replaces the
    CUDA RNG tracker; the learner runs without dropout, so it never forks a CUDA stream anyway.
    """
    from megatron.core import tensor_parallel

    host_seed = seed + 100 * pp_rank
    random.seed(host_seed)
    np.random.seed(host_seed)
    torch.manual_seed(host_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(
        host_seed, inference_rng_tracker=not torch.cuda.is_available(), force_reset_rng=True
    )


def init_parallel(
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    virtual_pipeline_parallel_size: int | None = None,
    *,
    backend: str | None = None,
    seed: int = 1234,
    timeout_minutes: int = 30,
    context_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    expert_tensor_parallel_size: int = 1,
) -> ParallelGroups:
    """Initialise torch.distributed (if needed), megatron's TP/PP/CP/DP (and EP) groups and the RNGs.

    backend: None picks nccl with CUDA and gloo without. Reads the torchrun environment; without
    one it creates a single-process world. Applies the CPU shims when CUDA is absent. Call
    `destroy_parallel()` before initialising again with another layout in the same process.
    """
    apply_cpu_shims()  # before megatron-core's first import (0.19 needs triton without them)
    from megatron.core import parallel_state

    has_cuda = torch.cuda.is_available()
    if has_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    _init_process_group(backend or ("nccl" if has_cuda else "gloo"), timeout_minutes)

    world_size = dist.get_world_size()
    model_parallel = tensor_parallel_size * pipeline_parallel_size * context_parallel_size
    if min(tensor_parallel_size, pipeline_parallel_size, context_parallel_size) < 1 or world_size % model_parallel:
        raise ValueError(
            f"learner.tensor_parallel_size ({tensor_parallel_size}) x learner.pipeline_parallel_size "
            f"({pipeline_parallel_size}) x learner.context_parallel_size ({context_parallel_size}) must divide "
            f"the world size ({world_size} processes)"
        )
    expert_parallel = expert_model_parallel_size * expert_tensor_parallel_size * pipeline_parallel_size
    if min(expert_model_parallel_size, expert_tensor_parallel_size) < 1 or world_size % expert_parallel:
        raise ValueError(
            f"learner.expert_model_parallel_size ({expert_model_parallel_size}) x "
            f"learner.expert_tensor_parallel_size ({expert_tensor_parallel_size}) x learner.pipeline_parallel_size "
            f"({pipeline_parallel_size}) must divide the world size ({world_size} processes)")
    vpp = virtual_pipeline_parallel_size if (virtual_pipeline_parallel_size or 1) > 1 else None
    if vpp is not None and pipeline_parallel_size == 1:
        raise ValueError("learner.virtual_pipeline_parallel_size > 1 needs learner.pipeline_parallel_size > 1")
    if parallel_state.model_parallel_is_initialized():
        raise RuntimeError("megatron parallel state is already initialised; call destroy_parallel() first")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_parallel_size,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=context_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        expert_tensor_parallel_size=expert_tensor_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    ps = parallel_state
    groups = ParallelGroups(
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        pp_group=parallel_state.get_pipeline_model_parallel_group(),
        dp_group=parallel_state.get_data_parallel_group(),
        dp_group_gloo=parallel_state.get_data_parallel_group_gloo(),
        embedding_group=parallel_state.get_embedding_group(check_initialized=False),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=tensor_parallel_size,
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        pp_size=pipeline_parallel_size,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        vpp_size=vpp,
        rank=dist.get_rank(),
        world_size=world_size,
        device=torch.device("cuda", torch.cuda.current_device()) if has_cuda else torch.device("cpu"),
        cp_size=context_parallel_size,
        cp_rank=ps.get_context_parallel_rank(),
        cp_group=ps.get_context_parallel_group(),
        ep_size=expert_model_parallel_size,
        ep_rank=ps.get_expert_model_parallel_rank(),
        ep_group=ps.get_expert_model_parallel_group(),
        etp_size=expert_tensor_parallel_size,
        etp_rank=ps.get_expert_tensor_parallel_rank(),
        etp_group=ps.get_expert_tensor_parallel_group(),
    )
    seed_everything(seed, groups.pp_rank)
    return groups


def destroy_parallel(*, destroy_process_group: bool = True) -> None:
    """Tear down megatron's groups and (if `init_parallel` created it) the default process group.

    `destroy_process_group=False` keeps the world so that `init_parallel` can set up another
    TP/PP layout in the same processes (used by the distributed tests).
    """
    global _OWNS_PROCESS_GROUP
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if destroy_process_group and _OWNS_PROCESS_GROUP and dist.is_initialized():
        dist.destroy_process_group()
        _OWNS_PROCESS_GROUP = False
