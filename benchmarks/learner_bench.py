"""Learner benchmarks: packed vs padded micro-batches on RL-like lengths, chunked vs full log-probs.

    # CPU (tiny default shape, fp32, local layer spec); one JSON line per measurement
    python benchmarks/learner_bench.py
    # one GPU, the Qwen3-1.7B shape in bf16 with megatron's local spec (the packed attention core)
    python benchmarks/learner_bench.py --hidden 2048 --ffn 6144 --layers 28 --heads 16 --kv-heads 8 \\
        --head-dim 128 --vocab 151936 --num-seqs 64 --max-len 2048 --median-response 512 \\
        --micro-batch-tokens 8192 --logprob-chunk-tokens 1024 --use-te false
    torchrun --nproc-per-node 2 benchmarks/learner_bench.py --tp 2     # tensor / pipeline parallel
    # 4 GPUs: FP8 blockwise with sequence parallel (packs aligned to 128 x TP tokens)
    torchrun --nproc-per-node 4 benchmarks/learner_bench.py --tp 4 --sequence-parallel --precision fp8 --use-te true

packing   the same learner and weights train on one batch whose lengths look like RL rollouts
          (a prompt of 32-160 tokens and a log-normal response: most short, a long tail up to
          --max-len): right-padded micro-batches (`learner.pack_sequences=false`) against THD
          packs (true). Prints tokens/s of real tokens, MFU, padding share, micro-batches and
          peak memory of a step for each, and their ratios.
attention the learner's first-layer core attention alone, forward + backward over the step's
          micro-batches in each layout (where the packed CPU path loops over sequences)
logprobs  peak memory of the old-log-prob pass over the same batch: every position's logits at
          once (`all_tokens`, one chunk: what the learner computed before) against the response
          tokens in chunks of --logprob-chunk-tokens; and the training pass with one chunk
          against chunks (recomputed in the backward).

MFU = model FLOPs / s / peak FLOP/s, model FLOPs of a step = 3x the forward matmuls of the real
tokens (2 x matmul params per token, output layer included) + causal attention (2 x L x q_dim
per token and layer, summed per sequence); padding is waste and not counted. The peak is
measured in the same run with a large matmul in the step's dtype unless --peak-tflops is given.
Peak memory: torch.cuda.max_memory_allocated above what was allocated before the call on a GPU;
on the CPU torch's profiler allocation events (megatron_s2lpo/planner/measure.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from timing import median_seconds  # noqa: E402  (the matmul peak)

from megatron_s2lpo.algo.losses import PolicyLossConfig  # noqa: E402
from megatron_s2lpo.config.learner import LearnerConfig, OptimConfig  # noqa: E402
from megatron_s2lpo.config.model import ModelArch  # noqa: E402
from megatron_s2lpo.types import TrainBatch  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", default="qwen3", choices=["qwen3", "qwen2", "llama"])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=768)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--num-seqs", type=int, default=32)
    p.add_argument("--max-len", type=int, default=1024, help="longest prompt + response")
    p.add_argument("--median-response", type=int, default=64, help="median response tokens (log-normal)")
    p.add_argument("--fixed-len", type=int, default=0, help="every sequence this long instead (no padding to save)")
    p.add_argument("--recompute", default="none", choices=["none", "full", "selective"])
    p.add_argument("--micro-batch-tokens", type=int, default=2048)
    p.add_argument("--logprob-chunk-tokens", type=int, default=256)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--precision", default=None, help="fp32 | bf16 | fp8 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--fp8-recipe", default="blockwise", choices=["blockwise", "tensorwise"])
    p.add_argument("--sequence-parallel", action="store_true", help="TE spec, TP > 1")
    p.add_argument("--use-te", default="auto", choices=["auto", "true", "false"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--mode", default="all", choices=["all", "packing", "attention", "logprobs"])
    p.add_argument("--peak-tflops", type=float, default=None, help="use this peak instead of measuring it")
    return p.parse_args()


def rl_lengths(num: int, max_len: int, median_response: int, seed: int = 0) -> list[int]:
    """Prompt 32-160 tokens + a log-normal response (sigma 1: most short, a long tail), capped."""
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(32, 161, (num,), generator=gen)
    responses = torch.exp(torch.randn(num, generator=gen) + math.log(median_response)).long().clamp(min=8)
    return [int(min(p + r, max_len)) for p, r in zip(prompts, responses)]


def train_flops(arch: ModelArch, seq_lens: list[int]) -> float:
    """Model FLOPs of one training step over sequences of these lengths (module docstring)."""
    q_dim, kv_dim, h = arch.num_attention_heads * arch.head_dim, arch.num_query_groups * arch.head_dim, arch.hidden_size
    matmul = arch.num_layers * (h * (q_dim + 2 * kv_dim) + q_dim * h + 3 * h * arch.ffn_hidden_size) + h * arch.vocab_size
    forward = sum(2 * matmul * n + arch.num_layers * 2 * n * n * q_dim for n in seq_lens)
    return 3.0 * forward


def measured_peak_flops(dtype: torch.dtype, device: torch.device) -> float:
    n = 4096 if device.type == "cuda" else 1536
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    calls = 4 if device.type == "cuda" else 1

    def matmuls():
        for _ in range(calls):
            a @ b
        _sync(device)

    return 2.0 * n**3 * calls / median_seconds(matmuls, repeats=5, warmup=1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_bytes(fn, device: torch.device) -> int:
    """Peak memory `fn` allocates above what was live before it (GPU: CUDA allocator; CPU: profiler)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from megatron_s2lpo.planner.measure import peak_allocated_bytes

    return peak_allocated_bytes(fn)[0]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def bench_packing(learner, batch: TrainBatch, arch: ModelArch, peak: float, repeats: int) -> dict:
    """Padded vs packed micro-batches of the same batch on the same learner (a train step each:
    forward, backward and the optimizer step; the tiny lr keeps the weights where they were).

    The layouts alternate (padded, packed, padded, ...) after one warm-up step each, so load
    from other work on a shared machine falls on both alike; medians of `repeats` steps each."""
    loss, device, world = PolicyLossConfig(), learner.groups.device, learner.groups.world_size
    lens = [int(n) for n in batch.seq_lens]
    flops, tokens = train_flops(arch, lens), sum(lens)
    layouts = {"padded": False, "packed": True}

    def step(packed: bool) -> float:
        learner.config.pack_sequences = packed
        _barrier()
        start = time.perf_counter()
        learner.train_step(batch, loss_config=loss)
        _sync(device)
        return time.perf_counter() - start

    for packed in layouts.values():
        step(packed)  # warm-up: allocator growth, first-call imports
    times: dict[str, list[float]] = {name: [] for name in layouts}
    for _ in range(repeats):
        for name, packed in layouts.items():
            times[name].append(step(packed))
    out = {}
    for name, packed in layouts.items():
        learner.config.pack_sequences = packed
        micro = learner._local_micro_batches(batch, learner.config.micro_batch_tokens)
        model_tokens = sum(m.input_shape[0] * m.input_shape[1] for m in micro)
        seconds = statistics.median(times[name])
        out[name] = {"step_s": round(seconds, 4), "tokens_per_s": round(tokens / seconds, 1),
                     "mfu": round(flops / seconds / world / peak, 4), "micro_batches": len(micro),
                     "padding_share": round(1 - tokens / (model_tokens * learner.groups.dp_size), 3),
                     "step_s_all": [round(t, 3) for t in times[name]],
                     "peak_mb": round(peak_bytes(lambda: step(packed), device) / 1e6, 1)}
    out["packed_over_padded_tokens_per_s"] = round(out["packed"]["tokens_per_s"] / out["padded"]["tokens_per_s"], 2)
    out["packed_over_padded_peak_memory"] = round(out["packed"]["peak_mb"] / out["padded"]["peak_mb"], 2)
    return out


def bench_attention(learner, batch: TrainBatch, repeats: int) -> dict:
    """The packed path's attention against the padded path's: the learner's own first-layer core
    attention (megatron's DotProductAttention on padded rows; with THD packs the local spec's
    packed core, attention.py), forward + backward over every micro-batch of a step in each
    layout, random q / k / v of the micro-batches' shapes, the layouts alternating."""
    from collections import Counter

    from megatron_s2lpo.learner.attention import attention_kernel
    from megatron_s2lpo.learner.model import unwrap_model
    from megatron_s2lpo.learner.step import packed_seq_params

    core = unwrap_model(learner.model[0]).decoder.layers[0].self_attention.core_attention
    heads, groups = core.num_attention_heads_per_partition, core.num_query_groups_per_partition
    head_dim, device = core.hidden_size_per_attention_head, learner.groups.device
    dtype = next(learner.model[0].parameters()).dtype
    layouts = {}
    for name, packed in (("padded", False), ("packed", True)):
        learner.config.pack_sequences = packed
        layouts[name] = learner._local_micro_batches(batch, learner.config.micro_batch_tokens)

    def run(micro_batches) -> float:
        start = time.perf_counter()
        for m in micro_batches:
            rows, length = m.input_shape
            shape = (length, rows) if m.packed is None else (length,)
            q, k, v = (torch.randn(*shape, n, head_dim, device=device, dtype=dtype, requires_grad=True)
                       for n in (heads, groups, groups))
            kwargs = {} if m.packed is None else {"packed_seq_params": packed_seq_params(m.packed, device)}
            core(q, k, v, None, **kwargs).float().sum().backward()
        _sync(device)
        return time.perf_counter() - start

    for micro in layouts.values():
        run(micro)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in layouts}
    for _ in range(repeats):
        for name, micro in layouts.items():
            times[name].append(run(micro))
    kernels = Counter(attention_kernel(torch.empty(0, device=device, dtype=dtype),
                                       (m.packed.cu_seqlens[1:] - m.packed.cu_seqlens[:-1]).tolist())
                      for m in layouts["packed"])
    out = {name: round(statistics.median(t), 4) for name, t in times.items()}
    return {"one_layer_fwd_bwd_s": out, "packed_over_padded_time": round(out["packed"] / out["padded"], 2),
            "packed_kernels": dict(kernels)}


def bench_logprobs(learner, batch: TrainBatch, chunk: int) -> dict:
    """Peak memory of the log-prob pass and of a training pass: all logits at once vs chunks."""
    loss, device, config = PolicyLossConfig(), learner.groups.device, learner.config
    config.pack_sequences = True
    config.logprob_chunk_tokens = 0
    full = peak_bytes(lambda: learner.compute_logprobs(batch, all_tokens=True), device)
    train_full = peak_bytes(lambda: learner.compute_gradients(batch, loss_config=loss), device)
    config.logprob_chunk_tokens = chunk
    chunked = peak_bytes(lambda: learner.compute_logprobs(batch), device)
    train_chunked = peak_bytes(lambda: learner.compute_gradients(batch, loss_config=loss), device)
    return {"logprob_pass_full_mb": round(full / 1e6, 1), "logprob_pass_chunked_mb": round(chunked / 1e6, 1),
            "logprob_pass_chunked_over_full": round(chunked / full, 3),
            "train_pass_one_chunk_mb": round(train_full / 1e6, 1), "train_pass_chunked_mb": round(train_chunked / 1e6, 1),
            "train_pass_chunked_over_one_chunk": round(train_chunked / train_full, 3), "chunk_tokens": chunk}


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def main() -> None:
    from megatron_s2lpo.learner import Learner, destroy_parallel, init_parallel
    from megatron_s2lpo.learner.batching import random_batch

    args = parse_args()
    precision = args.precision or ("bf16" if torch.cuda.is_available() else "fp32")
    use_te = {"auto": None, "true": True, "false": False}[args.use_te]
    arch = ModelArch(family=args.family, vocab_size=args.vocab, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                     num_layers=args.layers, num_attention_heads=args.heads, num_query_groups=args.kv_heads,
                     head_dim=args.head_dim, qk_layernorm=args.family == "qwen3",
                     add_qkv_bias=args.family == "qwen2", max_position_embeddings=max(args.max_len, 4096))
    config = LearnerConfig(tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp, precision=precision,
                           fp8_recipe=args.fp8_recipe, sequence_parallel=args.sequence_parallel, use_te=use_te,
                           micro_batch_tokens=args.micro_batch_tokens, seq_length_multiple=1,
                           logprob_chunk_tokens=args.logprob_chunk_tokens, recompute_granularity=args.recompute,
                           optim=OptimConfig(lr=1e-7))
    groups = init_parallel(args.tp, args.pp)
    learner = Learner(arch, config, groups=groups)
    lens = ([args.fixed_len] * args.num_seqs if args.fixed_len
            else rl_lengths(args.num_seqs, args.max_len, args.median_response))
    batch = random_batch(lens, args.vocab, prompt_tokens=32, seed=1)
    batch.old_logprobs = learner.compute_logprobs(batch)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    peak = args.peak_tflops * 1e12 if args.peak_tflops else measured_peak_flops(dtype, groups.device)
    result = {"device": _device_name(), "threads": torch.get_num_threads(), "world_size": groups.world_size,
              "tp": args.tp, "pp": args.pp, "precision": precision, "params_M": round(arch.num_params() / 1e6, 2),
              "num_seqs": len(lens), "tokens": sum(lens), "max_len": max(lens),
              "median_len": sorted(lens)[len(lens) // 2], "micro_batch_tokens": args.micro_batch_tokens,
              "peak_tflops_per_rank": round(peak / 1e12, 3),
              "peak": "given" if args.peak_tflops else f"measured {dtype} matmul"}
    if args.mode in ("all", "packing"):
        result["packing"] = bench_packing(learner, batch, arch, peak, args.repeats)
    if args.mode in ("all", "attention"):
        result["attention"] = bench_attention(learner, batch, args.repeats)
    if args.mode in ("all", "logprobs"):
        result["logprobs"] = bench_logprobs(learner, batch, args.logprob_chunk_tokens)
    if groups.rank == 0:
        print(json.dumps(result), flush=True)
    destroy_parallel()


if __name__ == "__main__":
    main()
