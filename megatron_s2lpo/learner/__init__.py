"""Megatron learner: parallel init, GPT model, vocab-parallel log-probs, train step, checkpoints.

cpu_shims   the CPU stand-ins megatron-core needs without CUDA (one module, no-op with CUDA)
parallel    init_parallel / destroy_parallel -> ParallelGroups (TP, PP, VPP, DP)
model       build_gpt_model / build_model_chunks from a ModelArch (TE spec on GPU, local on CPU),
            option / FP8 checks, the deferred output layer
attention   the local spec's attention core, also for packed (THD) sequences
logprobs    log-probs and entropy of sampled tokens from vocab-parallel logits, chunked (pure torch)
batching    DP split and token-budget micro-batches: THD packs or padded rows (pure torch)
step        forward_step / loss_fn for megatron's get_forward_backward_func, metric reduction
optimizer   DDP wrappers, get_megatron_optimizer, OptimizerParamScheduler
offload     storages of weights, buffers and optimizer state to host memory and back
reference   frozen reference model for the KL penalty (host memory between its passes)
checkpoint  atomic dist_checkpointing save / load with trainer state and RNG
learner     Learner: what the trainer calls

Importing this package does not import megatron-core; the names below load on first use.
"""

from __future__ import annotations

from megatron_s2lpo.utils.lazy import lazy_exports

_EXPORTS = {
    "apply_cpu_shims": "cpu_shims",
    "ParallelGroups": "parallel",
    "init_parallel": "parallel",
    "destroy_parallel": "parallel",
    "build_gpt_model": "model",
    "build_model_chunks": "model",
    "transformer_config": "model",
    "unwrap_model": "model",
    "token_logprobs": "logprobs",
    "vocab_parallel_logprobs": "logprobs",
    "MicroBatch": "batching",
    "make_micro_batches": "batching",
    "pack_sequences": "batching",
    "bin_pack": "batching",
    "StorageOffloader": "offload",
    "ReferenceModel": "reference",
    "save_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "latest_checkpoint": "checkpoint",
    "prune_checkpoints": "checkpoint",
    "Learner": "learner",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS, globals())
