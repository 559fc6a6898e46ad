"""The learner's first H100 check: the Qwen3-1.7B shape in bf16 and FP8 (tensorwise, blockwise), packed.

    # one H100 (about 4 minutes), in the image (NGC PyTorch 25.11) or any environment with torch,
    # transformer-engine 2.9 and megatron-core 0.16.1:
    pip install megatron-core==0.16.1 && pip install --no-deps -e .
    python benchmarks/gpu_learner_check.py                      # all three recipes
    python benchmarks/gpu_learner_check.py --recipes fp8-blockwise --steps 5
    bash tests/gpu/h100_check.sh                                # this and the GPU test tier, one command

Without Transformer Engine the bf16 recipe runs on the local layer spec (FlashAttention varlen
packs; "spec": "local" in its line) and the FP8 recipes are reported as skipped.

Per recipe (TE layer spec, packed THD micro-batches, one GPU, random weights of the shape, an
RL-like batch: 64 sequences of a 32-160-token prompt and a log-normal response, median 1,024,
capped at 4,096 tokens):

  mfu          model FLOPs of a train step (forward + backward + Adam over the real tokens; 6 x
               matmul params per token + causal attention, padding not counted) per second,
               over the bf16 matmul peak measured in the same run (and for FP8 also over twice
               that, the FP8 peak); `tokens_per_s` the same in tokens
  memory       torch.cuda.max_memory_allocated of a train step next to the planner's estimate of
               what the allocator holds (planner/estimate.py without CUDA context, NCCL,
               workspaces and fragmentation), and the CUDA context measured as the device memory
               in use that the allocator does not account for (the planner assumes 0.6 GB)
  on-policy    the old log-probs computed over the whole batch in larger packs
               (logprob_micro_batch_tokens = 4 x micro_batch_tokens), as the trainer does; then the
               first mini-batch (of 4): `on_policy` = the training forward's ratio exp(new - old)
               before any update (mean, max, clip fraction at clip 0.2, ppo_kl) and
               `pack_dependence` = the same rows' log-probs in the training pass's packs (no grad)
               against the old ones (ratio statistics, mean |new - old|). With the same weights
               the ratio is 1 up to kernel rounding; tensorwise FP8 scales each pack by its own
               amax, so the two passes quantize differently (docs/learner.md, "FP8 fit for RL");
               blockwise scales 1 x 128 tiles of a token and does not

Prints one JSON line per recipe and a table. Exit 2 without CUDA. The pure parts (batch, FLOPs,
statistics, the planner's figure) are unit-tested on the CPU (tests/unit/test_gpu_learner_check.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import time

# Transformer Engine reads this once, at import; the bf16 recipe imports TE before the blockwise
# one runs (the learner refuses a mismatch: learner/model.py apply_fp8_scale_environment).
os.environ.setdefault("NVTE_FP8_BLOCK_SCALING_FP32_SCALES", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from learner_bench import measured_peak_flops, rl_lengths, train_flops  # noqa: E402

from megatron_s2lpo.algo.losses import PolicyLossConfig  # noqa: E402
from megatron_s2lpo.config.learner import LearnerConfig, OptimConfig  # noqa: E402
from megatron_s2lpo.planner.archs import KNOWN_ARCHS  # noqa: E402
from megatron_s2lpo.planner.estimate import GPU, estimate_learner  # noqa: E402

RECIPES = {"bf16": dict(precision="bf16"),
           "fp8-tensorwise": dict(precision="fp8", fp8_recipe="tensorwise", fp8_format="hybrid"),
           "fp8-blockwise": dict(precision="fp8", fp8_recipe="blockwise", fp8_format="e4m3")}
ARCH = KNOWN_ARCHS["qwen3-1.7b"]
NOT_ALLOCATOR = ("cuda context", "nccl", "workspaces", "fragmentation")  # planner items torch does not count


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated of {list(RECIPES)}")
    p.add_argument("--num-seqs", type=int, default=64)
    p.add_argument("--max-len", type=int, default=4096)
    p.add_argument("--median-response", type=int, default=1024)
    p.add_argument("--micro-batch-tokens", type=int, default=8192)
    p.add_argument("--steps", type=int, default=3, help="timed train steps per recipe (after one warm-up)")
    p.add_argument("--json", default="", help="also write the results, one JSON object per line, to this file")
    args = p.parse_args(argv)
    unknown = [r for r in args.recipes.split(",") if r not in RECIPES]
    if unknown:
        p.error(f"unknown recipe(s) {unknown}; choose from {list(RECIPES)}")
    return args


def learner_config(recipe: str, micro_batch_tokens: int, *, use_te: bool = True) -> LearnerConfig:
    """The recipe's learner: TE spec (local spec with use_te=False), packed, no recompute,
    expandable segments, tiny lr."""
    return LearnerConfig(use_te=use_te, pack_sequences=True, micro_batch_tokens=micro_batch_tokens,
                         logprob_micro_batch_tokens=4 * micro_batch_tokens, logprob_chunk_tokens=1024,
                         expandable_segments=True, optim=OptimConfig(lr=1e-7), **RECIPES[recipe])


def te_installed() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def recipe_skip_reason(recipe: str, *, te: bool, capability: tuple[int, int], cuda_version: str | None) -> str | None:
    """Why `recipe` cannot run here (None: it runs). Without Transformer Engine bf16 still runs,
    on the local spec (FlashAttention varlen packs); the FP8 recipes need TE."""
    from megatron_s2lpo.learner.model import fp8_support_error

    if RECIPES[recipe]["precision"] != "fp8":
        return None
    if not te:
        return "needs Transformer Engine (transformer_engine is not installed)"
    return fp8_support_error(RECIPES[recipe]["fp8_recipe"], capability, cuda_version)


def ratio_statistics(new: torch.Tensor, old: torch.Tensor, mask: torch.Tensor, clip: float = 0.2) -> dict:
    """Ratio exp(new - old) over the mask's tokens: mean, max, share outside [1 - clip, 1 + clip],
    mean |new - old|. (B, T) tensors; what PPO clipping sees on-policy."""
    keep = mask > 0
    diff = (new - old)[keep].double()
    ratio = diff.exp()
    return {"ratio_mean": float(ratio.mean()), "ratio_max": float(ratio.max()),
            "clip_frac": float(((ratio < 1 - clip) | (ratio > 1 + clip)).double().mean()),
            "mean_abs_logprob_diff": float(diff.abs().mean()), "tokens": int(keep.sum())}


def planner_allocated_bytes(config: LearnerConfig, max_seq_len: int) -> float:
    """The planner's training-step peak without what torch's allocator does not count."""
    est = estimate_learner(ARCH, config, dp_size=1, max_seq_len=max_seq_len, with_reference=False, backend=GPU)
    return est.phase("training step") - sum(est.item(name) for name in NOT_ALLOCATOR)


def check_recipe(recipe: str, args: argparse.Namespace, batch, peak_bf16: float) -> dict:
    from megatron_s2lpo.learner import Learner
    from megatron_s2lpo.algo.batch import take_rows

    te = te_installed()
    error = recipe_skip_reason(recipe, te=te, capability=torch.cuda.get_device_capability(),
                               cuda_version=torch.version.cuda)
    if error:
        return {"recipe": recipe, "skipped": error}
    config = learner_config(recipe, args.micro_batch_tokens, use_te=te)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    learner = Learner(ARCH, config)
    loss = PolicyLossConfig(clip_low=0.2, clip_high=0.2)
    batch.old_logprobs = learner.compute_logprobs(batch)  # the whole batch, in 4x larger packs
    mini = take_rows(batch, list(range(0, batch.num_seqs, 4)))  # the first of 4 mini-batches
    learner.config.logprob_micro_batch_tokens = args.micro_batch_tokens  # the training pass's packs
    same_packs = learner.compute_logprobs(mini)
    learner.config.logprob_micro_batch_tokens = 4 * args.micro_batch_tokens
    first = learner.compute_gradients(mini, loss_config=loss)  # the training forward, before any update
    learner.train_step(batch, loss_config=loss)  # warm-up of the full batch
    torch.cuda.synchronize()
    static = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        learner.train_step(batch, loss_config=loss)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated()
    free, total = torch.cuda.mem_get_info()
    context = (total - free) - torch.cuda.memory_reserved()
    lens = [int(n) for n in batch.seq_lens]
    seconds = statistics.median(times)
    flops = train_flops(ARCH, lens)
    result = {
        "recipe": recipe, "spec": "te" if te else "local", "device": torch.cuda.get_device_name(),
        "tokens": sum(lens), "step_s": round(seconds, 3),
        "tokens_per_s": round(sum(lens) / seconds), "mfu_bf16_peak": round(flops / seconds / peak_bf16, 3),
        "peak_allocated_gb": round(peak / 2**30, 2), "static_gb": round(static / 2**30, 2),
        "planner_allocated_gb": round(planner_allocated_bytes(config, max(lens)) / 2**30, 2),
        "cuda_context_gb": round(context / 2**30, 2),
        "on_policy": {key: first.get(key) for key in ("ratio_mean", "ratio_max", "clip_frac", "ppo_kl")},
        "pack_dependence": ratio_statistics(same_packs, mini.old_logprobs, mini.loss_mask),
    }
    if config.precision == "fp8":
        result["mfu_fp8_peak"] = round(flops / seconds / (2 * peak_bf16), 3)
    result["planner_over_measured"] = round(result["planner_allocated_gb"] / result["peak_allocated_gb"], 3)
    del learner
    import gc

    from megatron_s2lpo.learner import destroy_parallel

    destroy_parallel()
    gc.collect()
    torch.cuda.empty_cache()  # the next recipe's static memory starts from nothing
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_learner_check needs a CUDA GPU (an H100); see the module docstring", file=sys.stderr)
        return 2
    from megatron_s2lpo.learner.batching import random_batch

    lens = rl_lengths(args.num_seqs, args.max_len, args.median_response)
    peak = measured_peak_flops(torch.bfloat16, torch.device("cuda"))
    results = []
    for recipe in args.recipes.split(","):
        batch = random_batch(lens, ARCH.vocab_size, prompt_tokens=32, seed=1)
        result = check_recipe(recipe, args, batch, peak)
        results.append(result)
        print(json.dumps(result), flush=True)
        if args.json:
            with open(args.json, "a") as out:
                out.write(json.dumps(result) + "\n")
    print(f"\nbf16 matmul peak {peak / 1e12:.0f} TFLOP/s; {len(lens)} sequences, {sum(lens)} tokens, "
          f"longest {max(lens)}; micro_batch_tokens {args.micro_batch_tokens}")
    print(f"{'recipe':<16}{'tokens/s':>10}{'MFU':>7}{'peak GB':>9}{'planner':>9}{'ratio max':>11}{'clip frac':>11}")
    for r in results:
        if "skipped" in r:
            print(f"{r['recipe']:<16} skipped: {r['skipped']}")
            continue
        on = r["on_policy"]
        print(f"{r['recipe']:<16}{r['tokens_per_s']:>10}{r['mfu_bf16_peak']:>7.3f}{r['peak_allocated_gb']:>9.1f}"
              f"{r['planner_allocated_gb']:>9.1f}{on['ratio_max']:>11.4f}{on['clip_frac']:>11.5f}")
    return 0 if all(math.isfinite(r.get("step_s", 0.0)) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
