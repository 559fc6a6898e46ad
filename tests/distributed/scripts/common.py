"""Shared pieces of the distributed test scripts: tiny models, a fixed batch, check reporting.

Scripts run as `python tests/distributed/scripts/<name>.py` under tests/distributed/launch.py
(torchrun-style env). They report each check as a `CHECK {...}` line and keep going after a
failed check, so one launch answers many questions.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import traceback
from typing import Callable

import torch
import torch.distributed as dist

from megatron_s2lpo.config.model import ModelArch
from megatron_s2lpo.types import TrainBatch

RANK = int(os.environ.get("RANK", "0"))
VOCAB_SIZE = 300  # padded to 384 (TP=1) / 512 (TP=2): the padding must never matter


def tiny_arch(family: str = "qwen3", *, num_layers: int = 2, tie: bool = True) -> ModelArch:
    extra = {"qwen3": dict(qk_layernorm=True), "qwen2": dict(add_qkv_bias=True), "llama": {}}[family]
    return ModelArch(family=family, vocab_size=VOCAB_SIZE, hidden_size=64, ffn_hidden_size=96,
                     num_layers=num_layers, num_attention_heads=4, num_query_groups=2, head_dim=16,
                     rope_theta=10000.0, tie_word_embeddings=tie, **extra)


SEQ_LENS = (18, 24, 12, 20, 10, 22, 14, 16)  # budgets 192 / 96 / 48 give 1 / 2 / 4 micro-batches


def fixed_batch(seed: int = 0) -> TrainBatch:
    """8 right-padded prompt+response rows of different lengths with GRPO-like advantages."""
    g = torch.Generator().manual_seed(seed)
    seq_lens = torch.tensor(SEQ_LENS)
    num_seqs, max_len = len(SEQ_LENS), max(SEQ_LENS)
    tokens = torch.randint(0, VOCAB_SIZE, (num_seqs, max_len), generator=g)
    mask = torch.zeros(num_seqs, max_len)
    for b in range(num_seqs):
        tokens[b, seq_lens[b]:] = 0
        mask[b, 5:seq_lens[b]] = 1.0  # 5 prompt tokens
    rewards = torch.randint(0, 2, (num_seqs,), generator=g).float()
    adv = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
    zeros = torch.zeros(num_seqs, max_len)
    return TrainBatch(tokens=tokens, loss_mask=mask, advantages=adv[:, None] * mask, old_logprobs=zeros.clone(),
                      behaviour_logprobs=zeros.clone(), sources=torch.zeros(num_seqs, dtype=torch.long),
                      seq_lens=seq_lens)


def shared_tmpdir(prefix: str) -> str:
    """A temporary directory made by rank 0 and told to every rank (the ranks share a filesystem);
    initialises the default gloo group if the script has not."""
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    holder = [tempfile.mkdtemp(prefix=prefix) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def report_check(name: str, ok: bool, **details: object) -> None:
    if RANK == 0 or not ok:
        print("CHECK " + json.dumps({"name": name, "ok": bool(ok), "rank": RANK, **details}, default=float),
              flush=True)


def run_check(name: str, fn: Callable[[], dict | None]) -> None:
    """Run one check; report ok/failure (with the traceback) and continue with the next."""
    start = time.perf_counter()
    try:
        details = fn() or {}
        ok = bool(details.pop("ok", True))
        report_check(name, ok, seconds=round(time.perf_counter() - start, 2), **details)
    except Exception:  # noqa: BLE001 - the report carries the traceback
        report_check(name, False, error=traceback.format_exc()[-3000:])


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def global_grads(chunks: list) -> dict[str, torch.Tensor]:
    """main_grad of every parameter of bare/wrapped chunks, keyed by GLOBAL layer index names."""
    from megatron_s2lpo.learner.model import unwrap_model

    grads = {}
    for chunk in chunks:
        model = unwrap_model(chunk)
        layers = model.decoder.layers
        for name, param in model.named_parameters():
            if name.startswith("decoder.layers."):
                local, rest = name[len("decoder.layers."):].split(".", 1)
                name = f"decoder.layers.{layers[int(local)].layer_number - 1}.{rest}"
            grads[name] = param.main_grad.detach().clone().float()
    return grads


def layout_results(learner, batch, loss, *, packed: bool, chunk_tokens: int | None = None) -> dict:
    """Log-probs, entropy, loss metrics and per-parameter gradients of `learner` on `batch` with
    sequences packed (THD) or right-padded (and optionally another log-prob chunk size); the
    learner's config is restored afterwards."""
    config = learner.config
    saved = (config.pack_sequences, config.logprob_chunk_tokens)
    config.pack_sequences = packed
    if chunk_tokens is not None:
        config.logprob_chunk_tokens = chunk_tokens
    try:
        logprobs, entropy = learner.compute_logprobs(batch, 0.7, with_entropy=True)
        metrics = learner.compute_gradients(batch, loss_config=loss, temperature=0.7)
        return {"logprobs": logprobs, "entropy": entropy, "metrics": metrics, "grads": global_grads(learner.model)}
    finally:
        config.pack_sequences, config.logprob_chunk_tokens = saved


def compare_results(a: dict, b: dict, tol: float = 1e-6) -> dict:
    """Largest differences between two `layout_results` (ok when all are below tol)."""
    diffs = {"logprobs": max_abs_diff(a["logprobs"], b["logprobs"]),
             "entropy": max_abs_diff(a["entropy"], b["entropy"]),
             "loss": abs(a["metrics"]["loss"] - b["metrics"]["loss"]),
             "grads": max(max_abs_diff(a["grads"][k], b["grads"][k]) for k in a["grads"])}
    nonzero = bool((a["logprobs"] != 0).any()) and max(float(g.abs().max()) for g in a["grads"].values()) > 0
    return {"ok": nonzero and max(diffs.values()) < tol, **diffs,
            "micro_batches": (a["metrics"]["num_micro_batches"], b["metrics"]["num_micro_batches"])}


# Shapes of the planner check: the CPU estimate (planner/estimate.py, backend CPU) of one rank's
# peak in a training step must be within 25 % of the measured one.
PLANNER_SHAPES = (
    dict(hidden=128, layers=2, vocab=4096, lens=(256,) * 4, chunk=256, recompute="none"),
    dict(hidden=64, layers=6, vocab=2048, lens=(64,) * 16, chunk=64, recompute="none"),
    dict(hidden=192, layers=2, vocab=16384, lens=(96,) * 8, chunk=96, recompute="full"),
)


def planner_vs_measured(groups, tp: int, shapes=PLANNER_SHAPES) -> dict:
    """est / measured peak per shape: measured = this rank's storages (weights, DDP buffers, Adam
    state) + the profiler-measured peak of a step (planner/measure.py), after a first step."""
    from megatron_s2lpo.algo.losses import PolicyLossConfig
    from megatron_s2lpo.config.learner import LearnerConfig, OptimConfig
    from megatron_s2lpo.learner import Learner
    from megatron_s2lpo.learner.batching import random_batch
    from megatron_s2lpo.learner.offload import ddp_buffers, module_tensors, optimizer_tensors
    from megatron_s2lpo.planner.estimate import CPU, estimate_learner
    from megatron_s2lpo.planner.measure import peak_allocated_bytes, storage_bytes

    ratios = []
    for shape in shapes:
        h = shape["hidden"]
        arch = ModelArch(family="qwen3", vocab_size=shape["vocab"], hidden_size=h, ffn_hidden_size=3 * h,
                         num_layers=shape["layers"], num_attention_heads=4, num_query_groups=2, head_dim=h // 4,
                         qk_layernorm=True)
        config = LearnerConfig(tensor_parallel_size=tp, micro_batch_tokens=sum(shape["lens"]),
                               logprob_chunk_tokens=shape["chunk"], seq_length_multiple=1,
                               recompute_granularity=shape["recompute"], optim=OptimConfig(lr=1e-5))
        learner = Learner(arch, config, groups=groups)
        batch = random_batch(shape["lens"] * groups.dp_size, shape["vocab"])  # a full micro-batch per DP rank
        loss = PolicyLossConfig()
        learner.train_step(batch, loss_config=loss)  # Adam's state exists from here on
        param_buffers, grad_buffers = ddp_buffers(learner.model)
        static = storage_bytes(module_tensors(learner.model) + param_buffers + grad_buffers
                               + optimizer_tensors(learner.optimizer))
        backward, _ = peak_allocated_bytes(lambda: learner.compute_gradients(batch, loss_config=loss))
        step, _ = peak_allocated_bytes(learner.optimizer_step)
        estimate = estimate_learner(arch, config, dp_size=groups.dp_size, max_seq_len=max(shape["lens"]),
                                    with_reference=False, backend=CPU)
        ratios.append(round(estimate.peak / (static + max(backward, step)), 3))
    return {"ok": all(abs(r - 1) <= 0.25 for r in ratios), "estimate_over_measured": ratios}
