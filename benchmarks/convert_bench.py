"""Throughput of the streaming HF exporter (`convert.export.iter_hf_buckets`) on CPU.

    python benchmarks/convert_bench.py                 # ~1.1B-parameter Qwen3-like model, bf16, TP=1
    python benchmarks/convert_bench.py --quick         # small smoke run (seconds)
    python benchmarks/convert_bench.py --dtype fp32    # 4.5 GB of fp32 weights instead of 2.2 GB
    torchrun --nproc-per-node 2 benchmarks/convert_bench.py --tp 2   # TP=2 over gloo (all_gather)

Builds megatron-core model chunks with random weights (no initialisation pass, values filled
with randn), exports them into buckets that are dropped as they arrive, and prints the export
rate in GB/s of HF tensor bytes for `iter_hf_buckets` (fresh tensors per bucket) and
`iter_flat_buckets` (one reused buffer), next to the memory-copy bandwidth of `Tensor.copy_`
between two warm buffers measured in the same run, and the ratios. At TP=1 the exporter copies
each byte once (exported tensors never alias live parameters), so the copy bandwidth is its
ceiling; fresh tensors also pay the page faults of new memory on CPU.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from megatron_s2lpo.config.model import ModelArch  # noqa: E402
from shapes import QWEN3_1B, QWEN3_QUICK  # noqa: E402

FULL, QUICK = QWEN3_1B, QWEN3_QUICK
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def copy_bandwidth(num_bytes: int, repeats: int = 5) -> float:
    """GB/s of `dst.copy_(src)` over `num_bytes` (bytes copied / second, best of `repeats`)."""
    src = torch.randn(num_bytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: page in both buffers
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return src.numel() * 4 / best / 1e9


def export_rate(chunks, groups, arch: ModelArch, bucket_bytes: int, repeats: int, flat: bool
                ) -> tuple[float, int, int]:
    """(GB/s, bytes, buckets) of one full export, best of `repeats`."""
    import torch.distributed as dist

    from megatron_s2lpo.convert.export import iter_flat_buckets, iter_hf_buckets

    buffer = None  # flat: the first export allocates it, later ones reuse it (as a weight sync does)
    best, total, num_buckets = float("inf"), 0, 0
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        total = num_buckets = 0
        if flat:
            for bucket in iter_flat_buckets(chunks, groups, arch, bucket_bytes=bucket_bytes, buffer=buffer):
                total += sum(math.prod(s) * d.itemsize for s, d in zip(bucket.shapes, bucket.dtypes))
                num_buckets += 1
                buffer = bucket.buffer
        else:
            for bucket in iter_hf_buckets(chunks, groups, arch, bucket_bytes=bucket_bytes):
                total += sum(t.numel() * t.element_size() for _, t in bucket)
                num_buckets += 1
                del bucket  # a consumer would send it here
        best = min(best, time.perf_counter() - start)
    return total / best / 1e9, total, num_buckets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model, for a smoke run")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--bucket-mb", type=int, default=512, help="bucket size in MiB")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size (run under torchrun)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline parallel size (run under torchrun)")
    parser.add_argument("--repeats", type=int, default=3, help="exports per mode (best is reported)")
    args = parser.parse_args()

    from megatron_s2lpo.convert.mcore_io import build_conversion_chunks
    from megatron_s2lpo.learner.parallel import destroy_parallel, init_parallel

    arch = QUICK if args.quick else FULL
    dtype = DTYPES[args.dtype]
    groups = init_parallel(args.tp, args.pp)
    chunks = build_conversion_chunks(arch, groups, dtype)
    gen = torch.Generator().manual_seed(groups.rank)
    with torch.no_grad():
        for chunk in chunks:
            for param in chunk.parameters():
                param.copy_(torch.randn(param.shape, generator=gen, dtype=dtype))
    rank_bytes = sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())
    bucket_bytes = args.bucket_mb << 20
    fresh, total, num_buckets = export_rate(chunks, groups, arch, bucket_bytes, args.repeats, flat=False)
    flat, _, _ = export_rate(chunks, groups, arch, bucket_bytes, args.repeats, flat=True)
    copy_bytes = min(1 << 30, total)
    copy = copy_bandwidth(copy_bytes) if groups.rank == 0 else 0.0
    if groups.rank == 0:
        print(f"model: {arch.family} hidden={arch.hidden_size} layers={arch.num_layers} "
              f"vocab={arch.vocab_size} params={arch.num_params() / 1e9:.3f}B dtype={args.dtype} "
              f"TP={groups.tp_size} PP={groups.pp_size} (this rank holds {rank_bytes / 1e9:.2f} GB), "
              f"threads={torch.get_num_threads()}")
        print(f"export: {total / 1e9:.2f} GB of HF tensors, {num_buckets} buckets of <= {args.bucket_mb} MiB")
        print(f"memory copy (Tensor.copy_, {copy_bytes / 2**20:.0f} MiB buffer): {copy:.2f} GB/s")
        print(f"iter_hf_buckets   (fresh tensors): {fresh:.2f} GB/s  ratio to copy {fresh / copy:.2f}")
        print(f"iter_flat_buckets (reused buffer): {flat:.2f} GB/s  ratio to copy {flat / copy:.2f}")
    destroy_parallel()


if __name__ == "__main__":
    main()
