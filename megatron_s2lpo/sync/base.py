"""Small types every transport shares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_s2lpo.config.model import ModelArch


@dataclass(kw_only=True, slots=True)
class TransportContext:
    """What some transports need besides the engine and the config."""

    arch: ModelArch
    hf_config_dir: str | None = None  # disk: copy config.json / tokenizer files from here
    # The block-FP8 format the buckets are in (convert/fp8.py; an engine with --quantization fp8),
    # None for unquantized weights. The disk transport writes its quantization_config.
    quantization: Any = None


@dataclass(kw_only=True, slots=True)
class PushStats:
    """What one push moved."""

    num_bytes: int
    num_buckets: int
    path: str | None = None  # disk transport: the directory the engine loaded
