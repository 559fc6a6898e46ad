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

dist_checkpointing stores every model tensor under its global (unsharded) key, so the weights of a
checkpoint saved with one TP/PP/DP layout load into another. The distributed optimizer's state is
stored `dp_reshardable` by default (learner.checkpoint.optimizer_sharding): each DP rank writes its
own shard, nothing is gathered, and it loads into any DP size at the TP / PP / VPP it was saved
with (another layout is refused by name; load the weights only or save `fully_reshardable`, which
gathers every TP shard's fp32 params and Adam moments on the DP ranks and loads anywhere).

Asynchronous saves (learner.checkpoint.async_save, checkpoint_async.py): the tensors are staged to
host memory and written by a forked process while training continues; the commit above (COMPLETE,
rename, `latest`) runs only once every rank's write has finished, so a kill at any moment leaves
the previous checkpoint as the one a load picks.

Loads validate first (checkpoint_files.check_checkpoint: files present and as long as their
metadata says, metadata and trainer state readable, RNG files loadable as plain data, nothing
that would unpickle code). Loading a root takes the newest checkpoint that passes and logs a
warning naming the bad file of every newer one it skipped. A save that fails (a full disk is
named as such) removes its `.tmp-*` directory and leaves `latest` and every older checkpoint
as they were.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_s2lpo.utils.files import write_atomic
from megatron_s2lpo.utils.procs import barrier, on_any_rank

from .checkpoint_files import (COMPLETE, DIST_DIR, RNG_DIR, STATE_FILE, CheckpointSaveError, CorruptCheckpointError,
                               check_checkpoint, describe_save_failure, read_rng_file, rng_state, set_rng_state,
                               write_results_queue, write_rng_file)
from .model import unwrap_model

__all__ = ["CheckpointSaveError", "CorruptCheckpointError", "LoadedState", "latest_checkpoint", "load_checkpoint",
           "loadable_checkpoints", "prune_checkpoints", "resolve_checkpoint", "rng_state", "save_checkpoint",
           "set_rng_state"]

logger = logging.getLogger(__name__)

LATEST = "latest"
STEP_RE = re.compile(r"^step_(\d{8})$")


DEFAULT_SHARDING = "dp_reshardable"
LEGACY_SHARDING = "fully_reshardable"  # what checkpoints without a recorded sharding used


def sharded_metadata(optimizer_sharding: str = DEFAULT_SHARDING) -> dict:
    """Megatron's sharded-state-dict options (module docstring for the optimizer sharding).

    A fresh dict per call: megatron adds the current DP process group to it in place.
    """
    return {"distrib_optim_sharding_type": optimizer_sharding, "singleton_local_shards": False,
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


def sharded_state(model_chunks: list[Any], optimizer: Any | None, *, is_loading: bool,
                  optimizer_sharding: str = DEFAULT_SHARDING) -> dict:
    """The sharded state dict saved by dist_checkpointing: model chunk(s) and optimizer."""
    # Bare GPTModels: keys without wrapper prefixes, the same for DDP-wrapped and frozen models.
    model_chunks = [unwrap_model(chunk) for chunk in model_chunks]
    metadata = sharded_metadata(optimizer_sharding)
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


def model_layout(model_chunks: list[Any]) -> dict[str, int | None]:
    """TP / PP / VPP sizes of the model (what a dp_reshardable optimizer state is tied to)."""
    config = unwrap_model(model_chunks[0]).config
    return {"tp": config.tensor_model_parallel_size, "pp": config.pipeline_model_parallel_size,
            "vpp": config.virtual_pipeline_model_parallel_size}


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    *,
    model_chunks: list[Any],
    optimizer: Any | None = None,
    scheduler: Any | None = None,
    trainer_state: dict | None = None,
    extra_files: dict[str, bytes] | None = None,
    optimizer_sharding: str = DEFAULT_SHARDING,
    async_saves: Any = None,
) -> Path:
    """Save a checkpoint of `step` under `root` atomically (module docstring); collective.

    trainer_state: JSON-serialisable state of the caller (sampler position, algorithm schedule
    position, ...), returned by `load_checkpoint`. extra_files: {file name: contents} that rank 0
    writes into the checkpoint directory before it is marked complete (the caller reads them from
    `LoadedState.path`). optimizer_sharding: the distributed optimizer's format (module docstring).
    async_saves: a `checkpoint_async.AsyncSaves` to write in the background (the commit happens in
    its `finish`; nothing may be in flight in it). Returns the final directory (with async_saves:
    where the checkpoint will be once committed).
    """
    from megatron.core import dist_checkpointing

    root = Path(root)
    name = step_dir_name(step)
    final, tmp = root / name, root / f".tmp-{name}"
    if not on_any_rank(optimizer_has_state(optimizer)):  # the save layout must agree
        optimizer = None  # a fresh optimizer is restored by not loading any state
    state_text = json.dumps({"step": step, "trainer_state": trainer_state or {}, "optimizer": optimizer is not None,
                             "distributed_optimizer": _is_distributed(optimizer),
                             "optimizer_sharding": optimizer_sharding, "layout": model_layout(model_chunks),
                             "scheduler": scheduler.state_dict() if scheduler is not None else None},
                            indent=1, sort_keys=True)  # fails early (before any I/O) if not JSON
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crashed save
        (tmp / DIST_DIR).mkdir(parents=True)
        (tmp / RNG_DIR).mkdir()
    barrier()
    write_results_queue(cross_process=async_saves is not None)
    request = None
    try:  # megatron raises a failed write on every rank
        request = dist_checkpointing.save(
            sharded_state(model_chunks, optimizer, is_loading=False, optimizer_sharding=optimizer_sharding),
            str(tmp / DIST_DIR), content_metadata=sharded_metadata(optimizer_sharding),
            async_sharded_save=async_saves is not None)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # torch's CheckpointException derives from BaseException
        _abandon_save(tmp, step, err)
    _agree_or_abandon(tmp, step, lambda: write_rng_file(tmp / RNG_DIR / f"rank_{_rank():05d}.pt"))

    def commit() -> None:  # every rank, once every rank's shards are written
        _agree_or_abandon(tmp, step, (lambda: _commit(root, tmp, final, state_text, extra_files or {}))
                          if _rank() == 0 else None)

    if request is None:
        commit()
    else:
        async_saves.schedule(request, commit=commit, tmp=tmp, step=step, final=final)
    return final


def _commit(root: Path, tmp: Path, final: Path, state_text: str, extra_files: dict[str, bytes]) -> None:
    """Rank 0: extra files, trainer state and COMPLETE into `tmp`, fsync, rename to `final`, move `latest`."""
    for name, data in extra_files.items():
        if os.path.basename(name) != name or name in (STATE_FILE, COMPLETE, DIST_DIR, RNG_DIR):
            raise ValueError(f"extra checkpoint file name {name!r} must be a plain file name of its own")
        (tmp / name).write_bytes(data)
    (tmp / STATE_FILE).write_text(state_text)
    (tmp / COMPLETE).write_text("")
    _fsync_tree(tmp)
    if final.exists():  # re-saving a step: move the old copy aside first
        old = root / f".old-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_path(root)
    _write_file_atomic(root / LATEST, final.name + "\n")


def _agree_or_abandon(tmp: Path, step: int, work: Any) -> None:
    """Run this rank's `work` (None: nothing); if it failed on any rank, every rank abandons the save."""
    error: BaseException | None = None
    if work is not None:
        try:
            work()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # noqa: BLE001 - shared with the other ranks below
            error = err
    if on_any_rank(error is not None):
        _abandon_save(tmp, step, error or RuntimeError("the save failed on another rank (see its log)"))


def _abandon_save(tmp: Path, step: int, error: BaseException) -> None:
    """Remove the partial save (it may be what filled the disk) and raise CheckpointSaveError on every rank."""
    message = describe_save_failure(error, tmp.parent)
    if dist.is_initialized() and dist.get_world_size() > 1:
        # megatron tells every rank THAT a write failed but only its coordinator WHY: every rank
        # raises the most telling description (a full disk first)
        messages: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(messages, message)  # also: every rank is done with tmp
        message = next((m for m in messages if m.startswith("no space left")), messages[0])
    barrier()
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    latest = tmp.parent / LATEST
    kept = f"; {latest} still names {latest.read_text().strip()}, which stays loadable" if latest.is_file() else ""
    raise CheckpointSaveError(f"saving the checkpoint of step {step} under {tmp.parent} failed: {message}{kept}") \
        from error


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file() and (path / STATE_FILE).is_file() and (path / DIST_DIR).is_dir()


def _step_of(path: Path) -> int:
    return int(STEP_RE.match(path.name).group(1))


def _complete_checkpoints(root: Path) -> list[Path]:
    """The complete `step_*` directories under `root`, newest first."""
    return sorted((p for p in root.iterdir() if STEP_RE.match(p.name) and is_complete(p)), key=_step_of,
                  reverse=True)


def _named_by_latest(root: Path) -> Path | None:
    pointer = root / LATEST
    return root / pointer.read_text().strip() if pointer.is_file() else None


def loadable_checkpoints(root: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the checkpoint a load of `root` uses, [(newer checkpoint skipped, why)]).

    Candidates, newest first: the one `latest` names, then every complete `step_*` by step.
    The first that passes `check_checkpoint` is used; None when none does. Incomplete
    directories (no COMPLETE marker: a save that died) are not candidates and not reported.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory {root} does not exist; check learner.load / "
                                "run.output_dir, or start without resuming")
    complete = _complete_checkpoints(root)
    named = _named_by_latest(root)
    if named is not None and named in complete:
        complete.remove(named)
        complete.insert(0, named)
    skipped: list[tuple[Path, str]] = []
    for path in complete:
        try:
            check_checkpoint(path, _step_of(path))
        except CorruptCheckpointError as err:
            skipped.append((path, str(err)))
            continue
        return path, skipped
    return None, skipped


def latest_checkpoint(root: str | os.PathLike) -> Path:
    """The newest loadable checkpoint under `root` (see `loadable_checkpoints`); every newer one
    that was skipped is logged as a warning naming its bad file.

    FileNotFoundError when `root` holds no loadable checkpoint (the message lists the skipped ones).
    """
    path, skipped = loadable_checkpoints(root)
    for bad, why in skipped:
        logger.warning("checkpoint %s cannot be loaded (%s); %s", bad, why,
                       f"falling back to {path.name}" if path is not None else "no older checkpoint to fall back to")
    if path is None:
        found = "".join(f"\n  {bad.name}: {why}" for bad, why in skipped)
        raise FileNotFoundError(f"no loadable checkpoint under {root} (expected {LATEST} and step_XXXXXXXX/ "
                                f"directories containing {COMPLETE})" + (f"; found:{found}" if found else ""))
    return path


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory itself (validated: no fallback for a named checkpoint), or the
    newest loadable one under a checkpoint root."""
    path = Path(path)
    if STEP_RE.match(path.name):
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        if not is_complete(path):
            raise ValueError(f"checkpoint {path} is incomplete (no {COMPLETE} marker, {STATE_FILE} or "
                             f"{DIST_DIR}/): its save did not finish; load the checkpoint root instead "
                             "to get the latest complete one")
        try:
            check_checkpoint(path, _step_of(path))
        except CorruptCheckpointError as err:
            raise ValueError(f"checkpoint {path} cannot be loaded: {err}; load the checkpoint root to fall back "
                             "to the newest loadable one") from None
        return path
    return latest_checkpoint(path)


def _agreed_checkpoint(path: str | os.PathLike) -> Path:
    """resolve_checkpoint on rank 0, told to every rank, so all ranks load the same directory."""
    chosen: list[Any] = [None]
    error: BaseException | None = None
    if _rank() == 0:
        try:
            chosen[0] = resolve_checkpoint(path)
        except (FileNotFoundError, ValueError) as err:
            error = err
            chosen[0] = (type(err), str(err))
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(chosen, src=0)
    if error is not None:
        raise error
    if isinstance(chosen[0], tuple):
        raise chosen[0][0](chosen[0][1] + " [raised on rank 0]")
    return chosen[0]


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

    ckpt = _agreed_checkpoint(path)
    model_chunks = [unwrap_model(chunk) for chunk in model_chunks]
    saved = json.loads((ckpt / STATE_FILE).read_text())
    if not saved.get("optimizer", True):
        optimizer = None  # saved before the first step: the fresh optimizer is already right
    if optimizer is not None and saved.get("distributed_optimizer", False) != _is_distributed(optimizer):
        raise ValueError(
            f"checkpoint {ckpt} holds {'distributed' if saved['distributed_optimizer'] else 'plain'} optimizer "
            "state, which the current optimizer cannot read: set learner.optim.use_distributed_optimizer="
            f"{str(saved['distributed_optimizer']).lower()}, or load the weights only (load_optimizer=False)")
    sharding = saved.get("optimizer_sharding", LEGACY_SHARDING)
    if optimizer is not None and saved.get("distributed_optimizer") and sharding == "dp_reshardable":
        _check_same_layout(ckpt, saved.get("layout"), model_layout(model_chunks))
    loaded = dist_checkpointing.load(sharded_state(model_chunks, optimizer, is_loading=True,
                                                   optimizer_sharding=sharding), str(ckpt / DIST_DIR))
    if len(model_chunks) == 1:
        model_chunks[0].load_state_dict(loaded["model"], strict=True)
    else:
        for index, chunk in enumerate(model_chunks):
            chunk.load_state_dict(loaded[f"model{index}"], strict=True)
    if optimizer is not None:
        # megatron-core 0.16.1's load_parameter_state_from_dp_reshardable copies into the fp32
        # params without no_grad (its fs_model_space twin has it): an fp32 model fails there
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None and saved.get("scheduler") is not None:
        scheduler.num_steps = 0  # megatron's load_state_dict ADDS the saved step count
        scheduler.load_state_dict(saved["scheduler"])
    rng_file = ckpt / RNG_DIR / f"rank_{_rank():05d}.pt"
    if load_rng and rng_file.is_file():
        set_rng_state(read_rng_file(rng_file))
    barrier()
    return LoadedState(path=ckpt, step=int(saved["step"]), trainer_state=saved.get("trainer_state") or {},
                       scheduler_state=saved.get("scheduler"))


def _check_same_layout(ckpt: Path, saved: dict | None, current: dict) -> None:
    """A dp_reshardable optimizer state loads only at the TP / PP / VPP it was saved with."""
    if saved is not None and saved != current:
        names = {"tp": "tensor_parallel_size", "pp": "pipeline_parallel_size", "vpp": "virtual_pipeline_parallel_size"}
        diff = ", ".join(f"learner.{names[k]}: saved {saved.get(k)}, now {current.get(k)}"
                         for k in names if saved.get(k) != current.get(k))
        raise ValueError(
            f"checkpoint {ckpt} holds dp_reshardable optimizer state, which loads into any data-parallel size "
            f"but only at the model-parallel layout it was saved with ({diff}): resume with that layout, load the "
            "weights only (load_optimizer=False), or save with learner.checkpoint.optimizer_sharding="
            "fully_reshardable to move a run between layouts")


def prune_checkpoints(root: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints; rank 0 only. Never deleted: the one
    `latest` names and the newest loadable one (the fallback if a newer one turns out damaged)."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (run.keep_checkpoints), got {keep}")
    root = Path(root)
    if _rank() != 0 or not root.is_dir():
        return []
    protected = {loadable_checkpoints(root)[0], _named_by_latest(root)}
    removed = [p for p in _complete_checkpoints(root)[keep:] if p not in protected]
    for path in removed:
        shutil.rmtree(path)
    return removed
