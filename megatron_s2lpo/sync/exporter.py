"""Where the buckets come from: the live megatron learner, or a plain dict of HF tensors.

A bucket is a list of (HF name, full HF-shaped tensor) pairs. Two forms:
  buckets()       independent buckets of fresh tensors: a consumer may hold one while asking for
                  the next (needed to know which bucket is the last one);
  flat_buckets()  views into one reused buffer: valid only until the next bucket is requested,
                  but no allocation per bucket (the fast path when each bucket is consumed at once).

`MegatronExporter` wraps `convert.export` (collectives inside: every model-parallel rank of
the exporting replica must consume the same iterator to the end). `StateDictExporter` serves
tests and benchmarks that have HF tensors but no megatron model.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch

from megatron_s2lpo.config.model import ModelArch

Bucket = list[tuple[str, torch.Tensor]]


class Exporter(Protocol):
    def buckets(self) -> Iterator[Bucket]: ...

    def flat_buckets(self) -> Iterator[Bucket]: ...


class MegatronExporter:
    """HF-named buckets of live megatron model chunks (any TP / PP / VP), see convert/export.py."""

    def __init__(self, model_chunks: Sequence[Any], groups: Any, arch: ModelArch, bucket_bytes: int) -> None:
        self.model_chunks = list(model_chunks)
        self.groups = groups
        self.arch = arch
        self.bucket_bytes = bucket_bytes
        self._buffer: torch.Tensor | None = None  # the flat export's buffer, reused by every sync

    def buckets(self) -> Iterator[Bucket]:
        from megatron_s2lpo.convert.export import iter_hf_buckets

        yield from iter_hf_buckets(self.model_chunks, self.groups, self.arch, bucket_bytes=self.bucket_bytes)

    def flat_buckets(self) -> Iterator[Bucket]:
        from megatron_s2lpo.convert.export import iter_flat_buckets

        for flat in iter_flat_buckets(self.model_chunks, self.groups, self.arch,
                                      bucket_bytes=self.bucket_bytes, buffer=self._buffer):
            self._buffer = flat.buffer
            yield flat.tensors()


class StateDictExporter:
    """Buckets of a fixed set of HF tensors (a state dict), in the given order."""

    def __init__(self, named: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                 bucket_bytes: int) -> None:
        items = named.items() if isinstance(named, Mapping) else named
        self.named = [(name, tensor.detach()) for name, tensor in items]
        self.bucket_bytes = bucket_bytes

    def buckets(self) -> Iterator[Bucket]:
        from megatron_s2lpo.convert.export import bucketize

        yield from bucketize(((n, t.clone()) for n, t in self.named), self.bucket_bytes)

    def flat_buckets(self) -> Iterator[Bucket]:
        from megatron_s2lpo.convert.export import bucketize

        yield from bucketize(iter(self.named), self.bucket_bytes)


class QuantizingExporter:
    """Another exporter's buckets in block-FP8 storage format (convert/fp8.py): every linear
    projection's weight as float8_e4m3fn + float32 `weight_scale_inv`, everything else as it was.
    That is what an SGLang server started with `--quantization fp8` on a block-FP8 checkpoint
    holds, so each transport pushes these tensors unchanged (about half the bytes of bf16)."""

    def __init__(self, inner: Exporter, fmt: Any) -> None:
        self.inner = inner
        self.fmt = fmt  # convert.fp8.Fp8Format

    def buckets(self) -> Iterator[Bucket]:
        for bucket in self.inner.buckets():
            yield self.fmt.quantize_named(bucket)

    def flat_buckets(self) -> Iterator[Bucket]:
        # unquantized entries stay views into the inner buffer: consumed before the next bucket
        for bucket in self.inner.flat_buckets():
            yield self.fmt.quantize_named(bucket)


def bucket_bytes(bucket: Bucket) -> int:
    return sum(t.numel() * t.element_size() for _, t in bucket)


def with_last(buckets: Iterable[Bucket]) -> Iterator[tuple[Bucket, bool]]:
    """(bucket, is_last) pairs. Asks for bucket k+1 before handing out bucket k, so the buckets
    must be independent (`Exporter.buckets()`, not `flat_buckets()`)."""
    it = iter(buckets)
    try:
        current = next(it)
    except StopIteration:
        return
    for following in it:
        yield current, False
        current = following
    yield current, True
