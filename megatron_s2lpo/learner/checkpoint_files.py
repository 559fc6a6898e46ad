"""The files of one checkpoint: safe RNG files, validation before a load, save-failure messages.

Nothing read from a checkpoint is executed. RNG states are stored as tensors and plain Python
data and read with `torch.load(weights_only=True)`. torch.distributed.checkpoint reads its
`.metadata` with plain `pickle.load` and the byte items of its shards with
`torch.load(weights_only=False)`; `check_checkpoint` reads the first with an unpickler that
only builds torch's own checkpoint-metadata types and the second with `weights_only=True`
before the real load opens them, so a planted pickle is refused instead of run.

`check_checkpoint` also finds what a crash, a full disk or a damaged copy leaves: a missing
or truncated shard (every shard must hold the bytes its metadata points at), unreadable
metadata, a trainer state that does not parse, an RNG file that does not load. Its error names
the file, so the loader can skip to the previous checkpoint and say why.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import io
import json
import multiprocessing
import os
import pickle
import queue
import random
import shutil
from pathlib import Path

import numpy as np
import torch

COMPLETE = "COMPLETE"
DIST_DIR = "dist"
STATE_FILE = "trainer_state.json"
RNG_DIR = "rng"
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's pickled Metadata
MCORE_METADATA = "metadata.json"  # megatron's sharded-backend description
COMMON_FILE = "common.pt"  # megatron's non-sharded state (torch.save)


class CorruptCheckpointError(ValueError):
    """A checkpoint that cannot be loaded; `file` is the first file found wrong."""

    def __init__(self, file: Path | str, problem: str) -> None:
        super().__init__(f"{file}: {problem}")
        self.file = Path(file)
        self.problem = problem


class CheckpointSaveError(RuntimeError):
    """A save that did not complete (the previous checkpoint is untouched)."""


# ----------------------------------------------------------------------------- RNG files


def rng_state() -> dict:
    """RNG states of this rank as tensors and plain data: python, numpy, torch, CUDA, megatron's tracker."""
    from megatron.core import tensor_parallel

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tracker = tensor_parallel.get_cuda_rng_tracker().get_states()
    state = {"python": random.getstate(),
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state(),
             # graph-safe trackers hold torch.Generator objects: keep their state tensors
             "tracker": {name: s if isinstance(s, torch.Tensor) else s.get_state() for name, s in tracker.items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    saved = state["numpy"]
    np.random.set_state((saved["kind"], saved["keys"].numpy().astype(np.uint32), saved["pos"], saved["has_gauss"],
                         saved["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _tuple_state(value: object) -> tuple:
    # torch.save keeps tuples, but a state written by json-like tools may come back as lists
    return tuple(_tuple_state(v) for v in value) if isinstance(value, (list, tuple)) else value


def write_rng_file(path: Path) -> None:
    """This rank's RNG state to `path`, fsynced. Serialized in memory first so a failed write
    is the operating system's own error (ENOSPC), not a zip writer's 'unexpected pos'."""
    buffer = io.BytesIO()
    torch.save(rng_state(), buffer)
    with open(path, "wb") as f:
        f.write(buffer.getbuffer())
        f.flush()
        os.fsync(f.fileno())


def read_rng_file(path: Path) -> dict:
    """The RNG state in `path` (tensors and plain data only); CorruptCheckpointError otherwise."""
    try:
        state = torch.load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated zip, refused pickle, ...
        raise CorruptCheckpointError(path, f"not a loadable RNG state ({type(err).__name__}: "
                                     f"{str(err).splitlines()[0][:300]})") from None
    required = ("python", "numpy", "torch", "tracker")
    if not isinstance(state, dict) or any(k not in state for k in required) or not isinstance(state["numpy"], dict):
        raise CorruptCheckpointError(path, f"not an RNG state of this trainer (expected the keys {list(required)}, "
                                     "numpy as a dict)")
    state["python"] = _tuple_state(state["python"])
    return state


# ----------------------------------------------------------------------------- validation


_PLAIN_GLOBALS = {("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                  ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")}
_TORCH_VALUES = (torch.dtype, torch.layout, torch.memory_format)


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only torch.distributed.checkpoint's own dataclasses and enums (any of its modules,
    so newer torch versions' additions still load), dtypes, layouts, Size and paths; any other
    global (os.system, builtins.eval, ...) is refused."""

    def find_class(self, module: str, name: str) -> object:
        import importlib

        if module.startswith("torch.distributed.checkpoint."):
            obj = getattr(importlib.import_module(module), name, None)
            if isinstance(obj, type) and obj.__module__ == module and (
                    dataclasses.is_dataclass(obj) or (issubclass(obj, enum.Enum) and obj is not enum.Enum)):
                return obj
        elif module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), _TORCH_VALUES)):
            return getattr(torch, name)
        elif (module, name) in _PLAIN_GLOBALS:
            return getattr(importlib.import_module(module), name)
        raise pickle.UnpicklingError(f"refusing to load the global {module}.{name}")


def read_dcp_metadata(dist_dir: Path) -> object:
    """torch.distributed.checkpoint's Metadata of `dist_dir`, read without running any code."""
    path = dist_dir / DCP_METADATA
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CorruptCheckpointError(path, "missing") from None
    except Exception as err:  # noqa: BLE001 - truncated, refused or not a pickle at all
        raise CorruptCheckpointError(path, f"unreadable ({type(err).__name__}: {err})") from None


def _check_shards(dist_dir: Path, metadata: object) -> None:
    """Every shard holds the bytes the metadata points at; byte items load as plain data."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    storage = getattr(metadata, "storage_data", None)
    if not isinstance(storage, dict) or not storage:
        raise CorruptCheckpointError(dist_dir / DCP_METADATA, "holds no storage index")
    sizes: dict[str, int] = {}
    for index, info in storage.items():
        sizes[info.relative_path] = max(sizes.get(info.relative_path, 0), info.offset + info.length)
    for relative, needed in sorted(sizes.items()):
        path = dist_dir / relative
        if not path.is_file():
            raise CorruptCheckpointError(path, "missing (listed in the checkpoint's metadata)")
        if path.stat().st_size < needed:
            raise CorruptCheckpointError(path, f"truncated: {path.stat().st_size} bytes, the metadata needs {needed}")
    byte_items = {fqn for fqn, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
    for index, info in storage.items():
        if index.fqn not in byte_items or getattr(info, "transform_descriptors", None):
            continue
        with open(dist_dir / info.relative_path, "rb") as f:
            f.seek(info.offset)
            raw = f.read(info.length)
        try:
            torch.load(io.BytesIO(raw), weights_only=True)
        except Exception as err:  # noqa: BLE001 - a planted pickle or damaged bytes
            raise CorruptCheckpointError(dist_dir / info.relative_path,
                                         f"item {index.fqn!r} is not plain data ({type(err).__name__}); "
                                         "refusing to unpickle it") from None


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CorruptCheckpointError(path, "missing") from None
    except (OSError, ValueError) as err:
        raise CorruptCheckpointError(path, f"does not parse as JSON ({err})") from None
    if not isinstance(data, dict):
        raise CorruptCheckpointError(path, f"holds a JSON {type(data).__name__}, not an object")
    return data


def check_checkpoint(path: Path, step: int | None = None) -> dict:
    """Validate the checkpoint directory `path` before anything loads it; returns its trainer state
    file's content. CorruptCheckpointError naming the first bad file otherwise."""
    if not (path / COMPLETE).is_file():
        raise CorruptCheckpointError(path / COMPLETE, "missing: the save did not finish")
    saved = _load_json(path / STATE_FILE)
    if not isinstance(saved.get("step"), int) or (step is not None and saved["step"] != step):
        raise CorruptCheckpointError(path / STATE_FILE, f"records step {saved.get('step')!r}, the directory "
                                     f"name says {step}")
    dist_dir = path / DIST_DIR
    _load_json(dist_dir / MCORE_METADATA)
    _check_shards(dist_dir, read_dcp_metadata(dist_dir))
    common = dist_dir / COMMON_FILE
    if common.is_file():
        try:
            torch.load(common, weights_only=True)
        except Exception as err:  # noqa: BLE001
            raise CorruptCheckpointError(common, f"does not load as plain data ({type(err).__name__})") from None
    # RNG files are optional (checkpoints written by the conversion tool have none; a rank without
    # one keeps its RNG), but every one present must load.
    rng_files = sorted((path / RNG_DIR).glob("rank_*.pt")) if (path / RNG_DIR).is_dir() else []
    for rng_file in rng_files:
        read_rng_file(rng_file)
    return saved


# ----------------------------------------------------------------------------- saving


def write_results_queue(*, cross_process: bool) -> None:
    """Give megatron's checkpoint writer a results queue that starts no helper process.

    megatron-core's FileSystemWriterAsync passes results through a queue of a `spawn`
    multiprocessing Manager, started on the first save and kept for the life of the process. That
    server process (a fresh interpreter importing the caller's main module, about 330 MB) and the
    resource tracker it starts outlive a trainer killed with SIGKILL, forever. In the synchronous
    save every put and get of that queue happens in this process (the forked writers report to a
    queue of their own), so a plain queue.Queue does the same work. An asynchronous save writes
    in a process megatron forks, which reports through the queue: a `fork`-context
    multiprocessing.Queue (a pipe, inherited by the fork) carries that, again without a server.
    """
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return
    filesystem_async._results_queue = multiprocessing.get_context("fork").Queue() if cross_process else queue.Queue()


_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# Errors that crossed a process boundary (megatron gathers its writers' failures by pickling,
# which drops errno and __cause__) keep only their text.
_NO_SPACE_TEXTS = ("No space left on device", "Disk quota exceeded", f"[Errno {errno.ENOSPC}]",
                   f"[Errno {errno.EDQUOT}]")
# What torch's zip writer says when the filesystem takes fewer bytes than it wrote.
_SHORT_WRITE_MARKS = ("unexpected pos", "file write failed")


def _chain(err: BaseException) -> list[BaseException]:
    """err, its causes and contexts, and the per-rank failures of a CheckpointException."""
    seen: list[BaseException] = []
    todo = [err]
    while todo:
        item = todo.pop()
        if item is None or any(item is s for s in seen):
            continue
        seen.append(item)
        todo += [item.__cause__, item.__context__]
        for failure in (getattr(item, "failures", None) or {}).values():  # rank -> (exception, traceback)
            todo.append(failure[0] if isinstance(failure, tuple) else failure)
    return [e for e in seen if isinstance(e, BaseException)]


def describe_save_failure(err: BaseException, directory: Path) -> str:
    """What went wrong in a save, in words a user acts on; a full disk is named as such."""
    chain = _chain(err)
    free = shutil.disk_usage(directory if directory.exists() else directory.parent).free
    no_space = any(getattr(e, "errno", None) in _NO_SPACE_ERRNOS or any(t in str(e) for t in _NO_SPACE_TEXTS)
                   for e in chain)
    short_write = any(mark in str(e) for e in chain for mark in _SHORT_WRITE_MARKS)
    if no_space or (short_write and free < 64 * 2**20):
        return (f"no space left on device (ENOSPC) on the filesystem of {directory} ({free / 2**20:.1f} MiB "
                "free); free space or set run.keep_checkpoints lower, then resume")
    if short_write:
        return (f"a short write on the filesystem of {directory} ({free / 2**20:.0f} MiB free: a quota or a "
                f"failing disk?): {err}")
    return f"{type(err).__name__}: {err}"
