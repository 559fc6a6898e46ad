"""The files of one checkpoint: safe RNG files, validation before a load, save-failure messages.

Nothing read from a checkpoint is executed. RNG states are stored as tensors and plain Python
data and read with `torch.load(weights_only=True)`. torch.distributed.checkpoint reads its
`.metadata` with plain `pickle.load` and the byte items of its shards with
`torch.load(weights_only=False)` (after undoing a zstd transform the metadata names);
`check_checkpoint` reads the first with an unpickler that only builds torch's own
checkpoint-metadata types and the second, decompressed the same way, with `weights_only=True`
before the real load opens them, so a planted pickle is refused instead of run. A transform it
cannot undo itself (an unknown one, or zstd without a zstd module) is refused too.

`check_checkpoint` also finds what a crash, a full disk or a damaged copy leaves: a missing
or truncated shard (every shard must hold the bytes its metadata points at), a damaged item
header (each tensor item is a zip archive whose directory, headers and small records, CRC
included, must read back), unreadable metadata or metadata of another backend, a missing
`common.pt`, a trainer state that does not parse or lacks what the caller needs (`state_check`),
an extra file (the pipeline's pending rollouts) missing or not the bytes recorded at save time,
an RNG file that does not load. Its error names the file, so the loader can skip to the previous
checkpoint and say why. Damage inside a tensor's data bytes is found only by reading them all:
`find_damage` does that after a load failed, to name the file.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import hashlib
import io
import json
import multiprocessing
import os
import pickle
import queue
import random
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

COMPLETE = "COMPLETE"
DIST_DIR = "dist"
STATE_FILE = "trainer_state.json"
RNG_DIR = "rng"
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's pickled Metadata
MCORE_METADATA = "metadata.json"  # megatron's sharded-backend description
COMMON_FILE = "common.pt"  # megatron's non-sharded state (torch.save)
FILES_KEY = "files"  # trainer_state.json: {extra file name: {"bytes": n, "sha256": hex}} written at save
# What megatron-core's dist_checkpointing.save writes by default, and the only backends read here.
BACKENDS = {"sharded_backend": "torch_dist", "common_backend": "torch"}
ZSTD_TRANSFORM = "stream.zstd"  # torch.distributed.checkpoint._extension.ZStandard.registry_name()
_MAX_BYTE_ITEM = 256 * 2**20  # a decompressed byte item larger than this is not ours


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


class _FileSlice(io.RawIOBase):
    """Bytes [offset, offset + length) of an open file as a seekable file of their own (a zip
    reader on one item of a shard, without reading the item into memory)."""

    def __init__(self, f: io.BufferedReader, offset: int, length: int) -> None:
        super().__init__()
        self._f, self._start, self._length, self._pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buffer: bytearray | memoryview) -> int:
        size = max(0, min(len(buffer), self._length - self._pos))
        self._f.seek(self._start + self._pos)
        data = self._f.read(size)
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)


def _undo_transforms(raw: bytes, descriptors: Any, path: Path, fqn: str) -> bytes:
    """The bytes torch's reader would unpickle after undoing the item's transforms (zstd only)."""
    if not descriptors:
        return raw
    names = list(descriptors)
    name, _, version = str(names[0]).partition("/")
    if len(names) != 1 or name != ZSTD_TRANSFORM or version.partition(".")[0] != "1":
        raise CorruptCheckpointError(path, f"item {fqn!r} is stored with the transforms {names}, which this trainer "
                                     "neither writes nor checks; refusing to read it")
    try:
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw))
    except ImportError:
        try:
            import pyzstd

            reader = pyzstd.ZstdFile(io.BytesIO(raw))
        except ImportError:
            raise CorruptCheckpointError(path, f"item {fqn!r} is zstd-compressed and no zstd module (zstandard, "
                                         "pyzstd) is installed to check it; refusing to read it") from None
    chunks, size = [], 0
    try:
        while size <= _MAX_BYTE_ITEM and (chunk := reader.read(1 << 20)):  # a read may return less than asked
            chunks.append(chunk)
            size += len(chunk)
    except Exception as err:  # noqa: BLE001 - zstandard.ZstdError, pyzstd.ZstdError, OSError
        raise CorruptCheckpointError(path, f"item {fqn!r} does not decompress ({type(err).__name__}: {err})") from None
    data = b"".join(chunks)
    if len(data) > _MAX_BYTE_ITEM:
        raise CorruptCheckpointError(path, f"item {fqn!r} decompresses to more than {_MAX_BYTE_ITEM} bytes")
    return data


def _check_byte_item(f: io.BufferedReader, info: Any, path: Path, fqn: str) -> None:
    """A byte item (torch.load'ed with weights_only=False by torch's reader) loads as plain data."""
    f.seek(info.offset)
    raw = _undo_transforms(f.read(info.length), info.transform_descriptors, path, fqn)
    try:
        torch.load(io.BytesIO(raw), weights_only=True)
    except Exception as err:  # noqa: BLE001 - a planted pickle or damaged bytes
        raise CorruptCheckpointError(path, f"item {fqn!r} is not plain data ({type(err).__name__}); "
                                     "refusing to unpickle it") from None


def _is_tensor_data(member: str) -> bool:
    parts = member.split("/")
    return len(parts) >= 2 and parts[-2] == "data" and parts[-1].isdigit()


def _check_tensor_item(f: io.BufferedReader, info: Any, path: Path, fqn: str) -> None:
    """A tensor item (a torch.save zip archive) has an intact directory, member headers and small
    records (their CRC checked); its data records are left for the load (or `find_damage`)."""
    if info.transform_descriptors:
        names = list(info.transform_descriptors)
        if len(names) != 1 or str(names[0]).partition("/")[0] != ZSTD_TRANSFORM:
            raise CorruptCheckpointError(path, f"item {fqn!r} is stored with the transforms {names}, which this "
                                         "trainer neither writes nor checks; refusing to read it")
        return  # compressed tensors are read by torch with weights_only=True: nothing runs
    start, length = info.offset, info.length
    try:
        with zipfile.ZipFile(_FileSlice(f, start, length)) as archive:
            members = archive.infolist()
            if not any(m.filename.endswith("/data.pkl") for m in members):
                raise zipfile.BadZipFile("no data.pkl record")
            for member in members:
                if _is_tensor_data(member.filename):
                    archive.open(member).close()  # its local header must match the directory
                else:
                    archive.read(member)  # small: read and CRC-checked
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, KeyError,
            NotImplementedError, RuntimeError) as err:
        raise CorruptCheckpointError(path, f"item {fqn!r} (bytes {start}..{start + length}) is damaged "
                                     f"({type(err).__name__}: {err})") from None


def _storage_by_file(dist_dir: Path, metadata: Any) -> dict[str, list[tuple[Any, Any]]]:
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(storage, dict) or not storage:
        raise CorruptCheckpointError(dist_dir / DCP_METADATA, "holds no storage index")
    by_file: dict[str, list[tuple[Any, Any]]] = {}
    for index, info in storage.items():
        by_file.setdefault(info.relative_path, []).append((index, info))
    for items in by_file.values():
        items.sort(key=lambda item: item[1].offset)
    return by_file


def _check_shards(dist_dir: Path, metadata: Any) -> None:
    """Every shard holds the bytes the metadata points at; byte items load as plain data; tensor
    items are intact zip archives."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    by_file = _storage_by_file(dist_dir, metadata)
    for relative, items in sorted(by_file.items()):
        path = dist_dir / relative
        needed = max(info.offset + info.length for _, info in items)
        if not path.is_file():
            raise CorruptCheckpointError(path, "missing (listed in the checkpoint's metadata)")
        if path.stat().st_size < needed:
            raise CorruptCheckpointError(path, f"truncated: {path.stat().st_size} bytes, the metadata needs {needed}")
    byte_items = {fqn for fqn, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
    for relative, items in sorted(by_file.items()):
        path = dist_dir / relative
        with open(path, "rb") as f:
            for index, info in items:
                check = _check_byte_item if index.fqn in byte_items else _check_tensor_item
                check(f, info, path, index.fqn)


def find_damage(path: Path) -> str | None:
    """The first damaged file and item of the checkpoint directory `path` found by reading every
    tensor in full (weights_only=True; slow: for the message after a load failed), or None."""
    dist_dir = Path(path) / DIST_DIR
    try:
        metadata = read_dcp_metadata(dist_dir)
        _check_shards(dist_dir, metadata)
        by_file = _storage_by_file(dist_dir, metadata)
    except CorruptCheckpointError as err:
        return str(err)
    for relative, items in sorted(by_file.items()):
        file = dist_dir / relative
        with open(file, "rb") as f:
            for index, info in items:
                f.seek(info.offset)
                try:
                    raw = _undo_transforms(f.read(info.length), info.transform_descriptors, file, index.fqn)
                    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
                        archive.testzip()  # every record's CRC
                    torch.load(io.BytesIO(raw), weights_only=True)
                except CorruptCheckpointError as err:
                    return str(err)
                except Exception as err:  # noqa: BLE001
                    return f"{file}: item {index.fqn!r} does not load ({type(err).__name__}: {err})"
    return None


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


def file_record(data: bytes) -> dict:
    """What the trainer state records of an extra checkpoint file, to find it changed or cut."""
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _check_extra_files(path: Path, saved: dict) -> None:
    files = saved.get(FILES_KEY) or {}
    if not isinstance(files, dict):
        raise CorruptCheckpointError(path / STATE_FILE, f"{FILES_KEY!r} is not an object")
    for name, want in sorted(files.items()):
        file = path / name
        if os.path.basename(name) != name or not isinstance(want, dict):
            raise CorruptCheckpointError(path / STATE_FILE, f"lists the extra file {name!r} oddly")
        if not file.is_file():
            raise CorruptCheckpointError(file, "missing (the checkpoint recorded it at save time)")
        data = file.read_bytes()
        if len(data) != want.get("bytes"):
            raise CorruptCheckpointError(file, f"has {len(data)} bytes, the checkpoint recorded {want.get('bytes')}")
        if hashlib.sha256(data).hexdigest() != want.get("sha256"):
            raise CorruptCheckpointError(file, "differs from what was saved (sha256 mismatch)")


def check_dist_dir(dist_dir: Path) -> None:
    """Validate a dist_checkpointing directory (ours or Megatron-LM's) before megatron reads it."""
    dist_dir = Path(dist_dir)
    meta = _load_json(dist_dir / MCORE_METADATA)
    for key, want in BACKENDS.items():
        if meta.get(key, want) != want:
            raise CorruptCheckpointError(dist_dir / MCORE_METADATA, f"names {key} {meta.get(key)!r}; only "
                                         f"{want!r} checkpoints (dist_checkpointing's default) are read")
    _check_shards(dist_dir, read_dcp_metadata(dist_dir))
    common = dist_dir / COMMON_FILE
    if not common.is_file():
        raise CorruptCheckpointError(common, "missing (dist_checkpointing writes it with every checkpoint)")
    try:
        torch.load(common, weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise CorruptCheckpointError(common, f"does not load as plain data ({type(err).__name__})") from None


# (the saved trainer state, the checkpoint directory) -> None, or ValueError: what the caller needs is not there
StateCheck = Callable[[dict, Path], None]


def check_checkpoint(path: Path, step: int | None = None, *, state_check: StateCheck | None = None) -> dict:
    """Validate the checkpoint directory `path` before anything loads it; returns its trainer state
    file's content. CorruptCheckpointError naming the first bad file otherwise.

    state_check: called with the saved trainer state (the caller's dict) and `path`; a ValueError
    it raises (a key the caller needs is missing, a file of its own is damaged) makes the
    checkpoint unloadable with that message (naming trainer_state.json unless it names a file).
    """
    if not (path / COMPLETE).is_file():
        raise CorruptCheckpointError(path / COMPLETE, "missing: the save did not finish")
    saved = _load_json(path / STATE_FILE)
    if not isinstance(saved.get("step"), int) or (step is not None and saved["step"] != step):
        raise CorruptCheckpointError(path / STATE_FILE, f"records step {saved.get('step')!r}, the directory "
                                     f"name says {step}")
    check_dist_dir(path / DIST_DIR)
    _check_extra_files(path, saved)
    if state_check is not None:
        try:
            state_check(saved.get("trainer_state") if isinstance(saved.get("trainer_state"), dict) else {}, path)
        except ValueError as err:
            raise CorruptCheckpointError(path / STATE_FILE, str(err)) from None
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
