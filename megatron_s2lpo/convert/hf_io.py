"""Hugging Face checkpoint files: sharded safetensors with `model.safetensors.index.json`.

`HFReader` opens a model directory lazily (one tensor in memory at a time, memory-mapped);
`HFShardWriter` streams tensors into `model-0000i-of-0000n.safetensors` files of at most
`max_shard_bytes` each and writes the index on `close()`.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files copied next to converted weights so the output directory is a complete HF model.
AUX_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
    "tokenizer.model", "chat_template.jinja", "chat_template.json",
)
_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
                       "F64": torch.float64}


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '1.5GiB' / '1024' -> bytes (decimal units as in HF, binary with 'i')."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    s = text.strip().upper()
    num = s.rstrip("KMGTIB")
    unit = s[len(num):]
    try:
        return int(float(num) * units[unit])
    except (KeyError, ValueError):
        raise ValueError(f"cannot read size {text!r}; write e.g. 5GB, 500MB or 2GiB") from None


class HFReader:
    """Lazy reader of a HF model directory (`*.safetensors` with or without an index)."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        index_path = os.path.join(model_dir, INDEX_NAME)
        single = os.path.join(model_dir, SINGLE_NAME)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                self.weight_map: dict[str, str] = json.load(f)["weight_map"]
        elif os.path.isfile(single):
            with safe_open(single, framework="pt") as f:
                self.weight_map = {name: SINGLE_NAME for name in f.keys()}
        else:
            raise FileNotFoundError(
                f"no {INDEX_NAME} or {SINGLE_NAME} in {model_dir}: pass a Hugging Face model "
                "directory saved with safetensors (save_pretrained(..., safe_serialization=True))"
            )
        self._handles: dict[str, object] = {}

    def names(self) -> list[str]:
        return list(self.weight_map)

    def _handle(self, name: str):
        if name not in self.weight_map:
            raise KeyError(f"tensor {name!r} is not in the checkpoint at {self.model_dir}")
        file = self.weight_map[name]
        if file not in self._handles:
            path = os.path.join(self.model_dir, file)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} is listed in {INDEX_NAME} but does not exist")
            self._handles[file] = safe_open(path, framework="pt")
        return self._handles[file]

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    __getitem__ = get

    def __contains__(self, name: object) -> bool:
        return name in self.weight_map

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def dtype(self) -> torch.dtype:
        """dtype of the first tensor (HF checkpoints hold one dtype), read from the header."""
        name = next(iter(self.weight_map))
        code = self._handle(name).get_slice(name).get_dtype()
        if code not in _SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {code}; expected one of {sorted(_SAFETENSORS_DTYPES)}")
        return _SAFETENSORS_DTYPES[code]


class HFShardWriter:
    """Streams (name, tensor) pairs into safetensors shards of at most `max_shard_bytes`.

    A tensor larger than `max_shard_bytes` gets a shard of its own. Shards are written under
    temporary names and renamed to `model-0000i-of-0000n.safetensors` when the count is known.
    """

    def __init__(self, out_dir: str, max_shard_bytes: int = 5 * 10**9):
        if max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.max_shard_bytes = out_dir, max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []  # tensor names per written shard
        self._seen: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._seen:
            raise ValueError(f"tensor {name!r} written twice")
        self._seen.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        # own the memory: safetensors refuses views that share storage
        self._pending[name] = tensor.detach().to("cpu").contiguous().clone()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def add_all(self, items: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in items:
            self.add(name, tensor)

    def _tmp_name(self, i: int) -> str:
        return f"model-{i + 1:05d}.safetensors.tmp"

    def _flush(self) -> None:
        if not self._pending:
            return
        path = os.path.join(self.out_dir, self._tmp_name(len(self._shards)))
        save_file(self._pending, path, metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard and the index; returns the shard file names."""
        self._flush()
        n = len(self._shards)
        files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for i, names in enumerate(self._shards):
            os.replace(os.path.join(self.out_dir, self._tmp_name(i)), os.path.join(self.out_dir, files[i]))
            weight_map.update((name, files[i]) for name in names)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        with open(os.path.join(self.out_dir, INDEX_NAME), "w") as f:
            json.dump(index, f, indent=2)
        return files


def copy_aux_files(src_dir: str, out_dir: str) -> list[str]:
    """Copy config, generation config and tokenizer files that exist in `src_dir`."""
    copied = []
    for name in AUX_FILES:
        path = os.path.join(src_dir, name)
        if os.path.isfile(path):
            shutil.copy2(path, os.path.join(out_dir, name))
            copied.append(name)
    return copied
