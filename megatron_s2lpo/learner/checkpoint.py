"""Atomic, reshardable learner checkpoints: megatron dist_checkpointing + trainer state.

Layout of a checkpoint root:

    root/
      latest                      "step_00000012\\n": the newest complete checkpoint
      step_00000012/
        dist/                     megatron dist_checkpointing (torch_dist): model + optimizer
        trainer_state.json        step, LR scheduler, caller's state (sampler position, ...)
        rng/rank_00000.pt         python / numpy / torch / CUDA / megatron-tracker RNG per rank
        COMPLETE                  written last, before the directory is renamed into place
      .tmp-step_00000012/         only while a save is running (or after one crashed)

A save writes everything into `.tmp-<name>/`, fsyncs the files and directories, renames the
directory to `<name>/` and then replaces `latest` atomically (write `latest.tmp`, fsync,
`os.replace`). A crash at any point leaves the previous checkpoint and pointer untouched; the
stale `.tmp-*` directory is ignored by loads and removed by the next save of that step.

dist_checkpointing stores every tensor under its global (unsharded) key, so a checkpoint saved
with one TP/PP/DP layout loads into another. The optimizer state is stored "fully reshardable".
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_s2lpo.utils.files import write_atomic
from megatron_s2lpo.utils.procs import barrier, on_any_rank

from .model import unwrap_model

LATEST = "latest"
COMPLETE = "COMPLETE"
DIST_DIR = "dist"
STATE_FILE = "trainer_state.json"
STEP_RE = re.compile(r"^step_(\d{8})$")


def sharded_metadata() -> dict:
    """Megatron's sharded-state-dict options: optimizer state loadable by any DP size.

    A fresh dict per call: megatron adds the current DP process group to it in place.
    """
    return {"distrib_optim_sharding_type": "fully_reshardable", "singleton_local_shards": False,
            "chained_optim_avoid_prefix": True}


@dataclass(kw_only=True, slots=True)
class LoadedState:
    """What `load_checkpoint` returns besides the tensors it loaded in place."""

    path: Path
    step: int
    trainer_state: dict  # the dict passed to save_checkpoint(trainer_state=...)
    scheduler_state: dict | None


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for directory, _subdirs, files in os.walk(root):
        for name in files:
            _fsync_path(Path(directory) / name)
        _fsync_path(Path(directory))


def _write_file_atomic(path: Path, text: str) -> None:
    write_atomic(path, text)
    _fsync_path(path.parent)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def rng_state() -> dict:
    """RNG states of this rank: python, numpy, torch, CUDA and megatron's tracker."""
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def sharded_state(model_chunks: list[Any], optimizer: Any | None, *, is_loading: bool) -> dict:
    """The sharded state dict saved by dist_checkpointing: model chunk(s) and optimizer."""
    # Bare GPTModels: keys without wrapper prefixes, the same for DDP-wrapped and frozen models.
    model_chunks = [unwrap_model(chunk) for chunk in model_chunks]
    metadata = sharded_metadata()
    state: dict = {}
    if len(model_chunks) == 1:
        state["model"] = model_chunks[0].sharded_state_dict(metadata=metadata)
        model_sd = state["model"]
    else:  # interleaved pipeline: one entry per virtual stage, like megatron's trainer
        model_sd = {}
        for index, chunk in enumerate(model_chunks):
            state[f"model{index}"] = chunk.sharded_state_dict(metadata=metadata)
            model_sd.update(state[f"model{index}"])
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                          metadata=metadata)
    return state


def optimizer_has_state(optimizer: Any | None) -> bool:
    """False before the first step: Adam creates its moments lazily, there is nothing to save."""
    if optimizer is None:
        return False
    return any(len(opt.optimizer.state) > 0 for opt in getattr(optimizer, "chained_optimizers", [optimizer]))


def _is_distributed(optimizer: Any | None) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(opt, DistributedOptimizer) for opt in inner)


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    *,
    model_chunks: list[Any],
    optimizer: Any | None = None,
    scheduler: Any | None = None,
    trainer_state: dict | None = None,
) -> Path:
    """Save a checkpoint of `step` under `root` atomically (module docstring); collective.

    trainer_state: JSON-serialisable state of the caller (sampler position, algorithm schedule
    position, ...), returned by `load_checkpoint`. Returns the final directory.
    """
    from megatron.core import dist_checkpointing

    root = Path(root)
    name = step_dir_name(step)
    final, tmp = root / name, root / f".tmp-{name}"
    if not on_any_rank(optimizer_has_state(optimizer)):  # the save layout must agree
        optimizer = None  # a fresh optimizer is restored by not loading any state
    state_text = json.dumps({"step": step, "trainer_state": trainer_state or {}, "optimizer": optimizer is not None,
                             "distributed_optimizer": _is_distributed(optimizer),
                             "scheduler": scheduler.state_dict() if scheduler is not None else None},
                            indent=1, sort_keys=True)  # fails early (before any I/O) if not JSON
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crashed save
        (tmp / DIST_DIR).mkdir(parents=True)
        (tmp / "rng").mkdir()
    barrier()
    dist_checkpointing.save(sharded_state(model_chunks, optimizer, is_loading=False), str(tmp / DIST_DIR),
                            content_metadata=sharded_metadata())
    torch.save(rng_state(), tmp / "rng" / f"rank_{_rank():05d}.pt")
    barrier()
    if _rank() == 0:
        (tmp / STATE_FILE).write_text(state_text)
        (tmp / COMPLETE).write_text("")
        _fsync_tree(tmp)
        if final.exists():  # re-saving a step: move the old copy aside first
            old = root / f".old-{name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_path(root)
        _write_file_atomic(root / LATEST, name + "\n")
    barrier()
    return final


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file() and (path / STATE_FILE).is_file() and (path / DIST_DIR).is_dir()


def latest_checkpoint(root: str | os.PathLike) -> Path:
    """The checkpoint `latest` names, or the highest complete `step_*` if the pointer is unusable.

    FileNotFoundError when `root` holds no complete checkpoint.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory {root} does not exist; check learner.load / "
                                "run.output_dir, or start without resuming")
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if STEP_RE.match(named.name) and is_complete(named):
            return named
    steps = sorted((p for p in root.iterdir() if STEP_RE.match(p.name) and is_complete(p)),
                   key=lambda p: p.name, reverse=True)
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint under {root} (expected {LATEST} and "
                                f"step_XXXXXXXX/ directories containing {COMPLETE})")
    return steps[0]


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory itself, or the latest complete one under a checkpoint root."""
    path = Path(path)
    if STEP_RE.match(path.name):
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        if not is_complete(path):
            raise ValueError(f"checkpoint {path} is incomplete (no {COMPLETE} marker, {STATE_FILE} or "
                             f"{DIST_DIR}/): its save did not finish; load the checkpoint root instead "
                             "to get the latest complete one")
        return path
    return latest_checkpoint(path)


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model_chunks: list[Any],
    optimizer: Any | None = None,
    scheduler: Any | None = None,
    load_rng: bool = True,
) -> LoadedState:
    """Load model (and optimizer, scheduler, RNG) in place from a checkpoint or checkpoint root.

    Works across TP/PP/DP layouts (RNG states are restored only when this rank saved one).
    Collective over all ranks.
    """
    from megatron.core import dist_checkpointing

    ckpt = resolve_checkpoint(path)
    model_chunks = [unwrap_model(chunk) for chunk in model_chunks]
    saved = json.loads((ckpt / STATE_FILE).read_text())
    if not saved.get("optimizer", True):
        optimizer = None  # saved before the first step: the fresh optimizer is already right
    if optimizer is not None and saved.get("distributed_optimizer", False) != _is_distributed(optimizer):
        raise ValueError(
            f"checkpoint {ckpt} holds {'distributed' if saved['distributed_optimizer'] else 'plain'} optimizer "
            "state, which the current optimizer cannot read: set learner.optim.use_distributed_optimizer="
            f"{str(saved['distributed_optimizer']).lower()}, or load the weights only (load_optimizer=False)")
    loaded = dist_checkpointing.load(sharded_state(model_chunks, optimizer, is_loading=True), str(ckpt / DIST_DIR))
    if len(model_chunks) == 1:
        model_chunks[0].load_state_dict(loaded["model"], strict=True)
    else:
        for index, chunk in enumerate(model_chunks):
            chunk.load_state_dict(loaded[f"model{index}"], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None and saved.get("scheduler") is not None:
        scheduler.num_steps = 0  # megatron's load_state_dict ADDS the saved step count
        scheduler.load_state_dict(saved["scheduler"])
    rng_file = ckpt / "rng" / f"rank_{_rank():05d}.pt"
    if load_rng and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    barrier()
    return LoadedState(path=ckpt, step=int(saved["step"]), trainer_state=saved.get("trainer_state") or {},
                       scheduler_state=saved.get("scheduler"))


def prune_checkpoints(root: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (never the one `latest` names); rank 0 only."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (run.keep_checkpoints), got {keep}")
    root = Path(root)
    if _rank() != 0 or not root.is_dir():
        return []
    protected = latest_checkpoint(root)
    steps = sorted((p for p in root.iterdir() if STEP_RE.match(p.name) and is_complete(p)),
                   key=lambda p: p.name, reverse=True)
    removed = [p for p in steps[keep:] if p != protected]
    for path in removed:
        shutil.rmtree(path)
    return removed
