"""Learner throughput: tokens/s and model FLOP utilisation (MFU) of a GRPO train step.

    # CPU (tiny default shape, fp32, local layer spec); prints one JSON line per measurement
    python benchmarks/learner_bench.py
    # a Qwen3-0.6B-like shape on one GPU (bf16, Transformer Engine spec when installed)
    python benchmarks/learner_bench.py --hidden 1024 --ffn 3072 --layers 28 --heads 16 --kv-heads 8 \\
        --head-dim 128 --vocab 151936 --seq-len 4096 --num-seqs 16 --micro-batch-tokens 16384
    # tensor / pipeline parallel
    torchrun --nproc-per-node 2 benchmarks/learner_bench.py --tp 2

MFU = model FLOPs per second / peak FLOP/s. Model FLOPs of a train step are 3x the forward
matmul FLOPs (forward + backward, recompute not counted): per token 2 x (matmul parameters incl.
the output layer) + causal attention 2 x seq_len x q_dim per layer (QK^T and AV, half of the
square). Only real tokens count (padding is waste). The peak is MEASURED in the same run with a
large matmul in the step's precision (fp32 on CPU, bf16 on GPU) unless --peak-tflops is given,
so on CPU the figure says how close the step gets to the machine's own matmul speed.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.distributed as dist

from megatron_s2lpo.algo.losses import PolicyLossConfig
from megatron_s2lpo.config.learner import LearnerConfig, OptimConfig
from megatron_s2lpo.config.model import ModelArch
from megatron_s2lpo.types import TrainBatch


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
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--num-seqs", type=int, default=8)
    p.add_argument("--micro-batch-tokens", type=int, default=1024)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--precision", default=None, help="fp32 | bf16 | fp8 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--recompute", default="none", choices=["none", "full", "selective"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--peak-tflops", type=float, default=None, help="use this peak instead of measuring it")
    return p.parse_args()


def train_flops_per_token(arch: ModelArch, seq_len: int) -> float:
    q_dim, kv_dim = arch.num_attention_heads * arch.head_dim, arch.num_query_groups * arch.head_dim
    hidden = arch.hidden_size
    layer_matmul = hidden * (q_dim + 2 * kv_dim) + q_dim * hidden + 3 * hidden * arch.ffn_hidden_size
    forward = 2 * (arch.num_layers * layer_matmul + arch.hidden_size * arch.vocab_size)
    forward += arch.num_layers * 2 * seq_len * q_dim  # causal QK^T + AV: 2 * (2 * s * q_dim) / 2
    return 3.0 * forward


def measured_peak_flops(dtype: torch.dtype, device: torch.device) -> float:
    """Best of a few large square matmuls: the machine's practical peak for this dtype."""
    n = 4096 if device.type == "cuda" else 1536
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        start = time.perf_counter()
        for _ in range(4 if device.type == "cuda" else 1):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - start) / (4 if device.type == "cuda" else 1))
    return 2.0 * n**3 / best


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def synthetic_batch(num_seqs: int, seq_len: int, vocab: int) -> TrainBatch:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (num_seqs, seq_len), generator=g)
    mask = torch.ones(num_seqs, seq_len)
    mask[:, : seq_len // 4] = 0  # a prompt quarter
    adv = torch.randn(num_seqs, 1, generator=g) * mask
    zeros = torch.zeros(num_seqs, seq_len)
    return TrainBatch(tokens=tokens, loss_mask=mask, advantages=adv, old_logprobs=zeros, behaviour_logprobs=zeros,
                      sources=torch.zeros(num_seqs, dtype=torch.long), seq_lens=torch.full((num_seqs,), seq_len))


def timed(fn, device: torch.device, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    if dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / steps


def main() -> None:
    from megatron_s2lpo.learner import Learner, destroy_parallel, init_parallel

    args = parse_args()
    precision = args.precision or ("bf16" if torch.cuda.is_available() else "fp32")
    arch = ModelArch(family=args.family, vocab_size=args.vocab, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                     num_layers=args.layers, num_attention_heads=args.heads, num_query_groups=args.kv_heads,
                     head_dim=args.head_dim, qk_layernorm=args.family == "qwen3",
                     add_qkv_bias=args.family == "qwen2", max_position_embeddings=max(args.seq_len, 4096))
    config = LearnerConfig(tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp, precision=precision,
                           micro_batch_tokens=args.micro_batch_tokens, recompute_granularity=args.recompute,
                           optim=OptimConfig(lr=1e-5))
    groups = init_parallel(args.tp, args.pp)
    learner = Learner(arch, config, groups=groups)
    batch = synthetic_batch(args.num_seqs, args.seq_len, args.vocab)
    batch.old_logprobs = learner.compute_logprobs(batch)
    loss = PolicyLossConfig()
    step_s = timed(lambda: learner.train_step(batch, loss_config=loss), groups.device, args.steps, args.warmup)
    logprob_s = timed(lambda: learner.compute_logprobs(batch), groups.device, args.steps, args.warmup)

    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    peak = args.peak_tflops * 1e12 if args.peak_tflops else measured_peak_flops(dtype, groups.device)
    tokens = int(batch.seq_lens.sum())
    flops = train_flops_per_token(arch, args.seq_len) * tokens
    world = groups.world_size
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else _cpu_name(),
        "threads": torch.get_num_threads(), "world_size": world, "tp": args.tp, "pp": args.pp,
        "precision": precision, "params_M": round(arch.num_params() / 1e6, 2), "tokens_per_step": tokens,
        "step_s": round(step_s, 4), "train_tokens_per_s": round(tokens / step_s, 1),
        "logprob_tokens_per_s": round(tokens / logprob_s, 1),
        "model_tflops_per_s_per_rank": round(flops / step_s / world / 1e12, 4),
        "peak_tflops_per_rank": round(peak / 1e12, 4),
        "peak": "given" if args.peak_tflops else f"measured {dtype} matmul",
        "mfu": round(flops / step_s / world / peak, 4),
    }
    if groups.rank == 0:
        print(json.dumps(result), flush=True)
    destroy_parallel()


if __name__ == "__main__":
    main()
