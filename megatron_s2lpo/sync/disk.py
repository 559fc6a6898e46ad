"""Disk transport: each sync writes a complete HF model directory, then the engine loads it.

    <disk_dir>/weights_v00000007/      model-0000i-of-0000n.safetensors, index, config.json
    <disk_dir>/.tmp-weights_v00000008-<pid>/   (being written; never handed to an engine)

Atomicity: every file is written under a temporary directory name; only when the last shard,
the index and config.json are closed is the directory renamed to its final name (one rename,
atomic on POSIX), and only then does the engine get the path. A crash mid-write leaves a
`.tmp-*` directory that no engine is ever pointed at and that the next transport removes.
Power-loss durability (fsync) is not a goal: a sync directory is rebuilt from the learner at
the next sync. After the engine has loaded a directory, all but the newest `sync.disk_keep`
sync directories are deleted (an SGLang engine replays the newest one after a restart), and
so are directories of later versions (left by an abandoned run before a resume).

The directory must be readable by the engine: with an SGLang server on other nodes, put
`sync.disk_dir` on shared storage.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterable
from typing import Any

import torch

from megatron_s2lpo.config.model import ModelArch
from megatron_s2lpo.config.sync import SyncConfig
from megatron_s2lpo.convert.hf_io import HFShardWriter, copy_aux_files

from .base import PushStats, TransportContext
from .exporter import Bucket, bucket_bytes

logger = logging.getLogger(__name__)

SYNC_DIR_PREFIX = "weights_v"
TMP_PREFIX = ".tmp-"
_SYNC_DIR_RE = re.compile(rf"^{SYNC_DIR_PREFIX}(\d+)$")


def sync_dir_name(version: int) -> str:
    return f"{SYNC_DIR_PREFIX}{version:08d}"


def sync_dirs(root: str) -> list[tuple[int, str]]:
    """(version, path) of the finished sync directories under `root`, oldest first."""
    found = []
    for name in os.listdir(root):
        match = _SYNC_DIR_RE.match(name)
        if match and os.path.isdir(os.path.join(root, name)):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return sorted(found)


def prune_sync_dirs(root: str, keep: int, current_version: int) -> list[str]:
    """Keep the directory of `current_version` and the newest `keep - 1` older ones.

    Directories of LATER versions belong to an abandoned run (a resume from an earlier step)
    and are deleted too. Returns the deleted paths.
    """
    dirs = sync_dirs(root)
    older = [d for d in dirs if d[0] < current_version]
    doomed = older[:max(0, len(older) - (keep - 1))] + [d for d in dirs if d[0] > current_version]
    for _, path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return [path for _, path in doomed]


def remove_partial_dirs(root: str) -> list[str]:
    """Delete `.tmp-weights_v*` directories left by an interrupted write."""
    removed = []
    for name in os.listdir(root):
        if name.startswith(TMP_PREFIX + SYNC_DIR_PREFIX):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            removed.append(os.path.join(root, name))
    return removed


def write_hf_dir(out_dir: str, buckets: Iterable[Bucket], *, arch: ModelArch, shard_bytes: int,
                 hf_config_dir: str | None = None, quantization: Any = None) -> tuple[int, int]:
    """Stream buckets into safetensors shards + index + config.json; returns (bytes, buckets).

    config.json (and tokenizer files) come from `hf_config_dir` when it has them, else from
    `arch` with `torch_dtype` set to the dtype of the weights written. `quantization` (a
    convert.fp8.Fp8Format, the buckets' format) sets its `quantization_config`.
    """
    writer = HFShardWriter(out_dir, max_shard_bytes=shard_bytes)
    num_bytes = num_buckets = 0
    dtype = None
    for bucket in buckets:
        writer.add_all(bucket)
        num_bytes += bucket_bytes(bucket)
        num_buckets += 1
        # the training dtype: not a float8 weight's or its float32 scales'
        dtype = dtype or next((t.dtype for n, t in bucket
                               if t.dtype != torch.float8_e4m3fn and not n.endswith("_scale_inv")), None)
    if num_buckets == 0:
        raise ValueError("the export produced no tensors; is the model empty?")
    writer.close()
    copied = copy_aux_files(hf_config_dir, out_dir) if hf_config_dir else []
    if "config.json" not in copied:
        config = arch.to_hf_config_dict()
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
    if quantization is not None:
        from megatron_s2lpo.convert.fp8 import write_quantization_config

        write_quantization_config(out_dir, quantization)
    return num_bytes, num_buckets


def publish_hf_dir(final: str, tmp: str, buckets: Iterable[Bucket], *, arch: ModelArch, shard_bytes: int,
                   hf_config_dir: str | None = None, quantization: Any = None) -> tuple[int, int]:
    """`write_hf_dir` into `tmp`, then rename it to `final` (replacing an older `final`), so
    `final` is never half written; `tmp` is removed if anything fails. Returns (bytes, buckets)."""
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        result = write_hf_dir(tmp, buckets, arch=arch, shard_bytes=shard_bytes, hf_config_dir=hf_config_dir,
                              quantization=quantization)
        if os.path.exists(final):  # an earlier directory of the same name
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


class DiskTransport:
    """HF safetensors directory + `engine.update_weights_from_disk(path, version)`."""

    name = "disk"
    flat = True  # each bucket is written before the next is requested

    def __init__(self, engine: Any, config: SyncConfig, context: TransportContext) -> None:
        if not config.disk_dir:
            raise ValueError("sync.disk_dir is empty: set the directory the disk transport writes the "
                             "weights to (the trainer uses <run.output_dir>/sync); with an SGLang server "
                             "on another node it must be shared storage the server can read")
        hf_config_dir = context.hf_config_dir
        if hf_config_dir and not os.path.isdir(hf_config_dir):
            raise FileNotFoundError(f"hf_config_dir {hf_config_dir} is not a directory; pass the HF model "
                                    "directory whose config.json / tokenizer the sync directories copy")
        self.engine = engine
        self.arch = context.arch
        self.root = os.path.abspath(config.disk_dir)
        self.keep = config.disk_keep
        self.shard_bytes = config.bucket_bytes
        self.hf_config_dir = hf_config_dir
        self.quantization = context.quantization
        os.makedirs(self.root, exist_ok=True)
        for path in remove_partial_dirs(self.root):
            logger.warning("removed %s, left by an interrupted weight sync", path)

    def push(self, buckets: Iterable[Bucket], version: int) -> PushStats:
        final = os.path.join(self.root, sync_dir_name(version))
        tmp = os.path.join(self.root, f"{TMP_PREFIX}{sync_dir_name(version)}-{os.getpid()}")
        num_bytes, num_buckets = publish_hf_dir(final, tmp, buckets, arch=self.arch, shard_bytes=self.shard_bytes,
                                                hf_config_dir=self.hf_config_dir, quantization=self.quantization)
        self.engine.update_weights_from_disk(final, version)
        prune_sync_dirs(self.root, self.keep, version)
        return PushStats(num_bytes=num_bytes, num_buckets=num_buckets, path=final)

    def close(self) -> None:
        pass
