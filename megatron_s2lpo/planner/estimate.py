"""Per-GPU memory of the learner and the rollout servers, from the recipe's numbers alone.

Pure arithmetic (no torch, no megatron), so it runs on a login node before anything is
submitted. Every term is one thing megatron or the learner allocates:

  weights      this rank's parameters (TP shards, its pipeline stage's layers, the embedding on
               the first stage, the output layer on the last) at the parameter dtype; FP8 adds
               TE's cached FP8 copy and transpose of every linear weight (2 bytes / weight)
  grads        megatron DDP's contiguous fp32 gradient buffer (grad_reduce_in_fp32): 4 bytes / param
  optimizer    fp32 main weights (bf16 / fp8 only) + Adam's two fp32 moments, divided over DP with
               the distributed optimizer, minus the share moved to the host by optim.cpu_offload
  activations  what autograd keeps per token and layer for the backward (see `Backend`) at
               micro_batch_tokens, divided over TP (and SP for the layer-norm / residual terms),
               times the micro-batches a 1F1B pipeline keeps in flight on its first stage,
               reduced by recompute; plus the last stage's final hidden states
  log-probs    the chunked output-layer pass: logprob_chunk_tokens rows of vocab-parallel logits
               with the fp32 softmax buffers (16 bytes per logit in the backward), plus the
               output-layer and embedding weight-gradient temporaries
  reference    the frozen reference model's weights, on the device only during its pass with
               learner.ref_offload
  overhead     CUDA context, NCCL and TE workspaces (a fixed amount) and allocator fragmentation
               (a share of the dynamic part); 0 on the CPU

The peak of a training step is weights + grads + optimizer + activations + the largest
transient at the start of the backward (the log-prob chunk's buffers or, for kernels that keep
softmax probabilities, the attention backward). The reference pass (no grad) can be the peak
when the reference is not offloaded.

The per-token activation counts come from reading what megatron-core 0.16's layers save:
  gpu (TE spec, FlashAttention / cuDNN fused attention, bf16): 4h (two norm inputs and outputs)
      + 3q (qk-norm input, RoPE output, attention output) + 3kv + 3f (SwiGLU input 2f, fc2 input f)
  cpu (local spec, fp32, torch's math SDPA): 6h + 7q + 5kv + 5f, and the softmax probabilities
      heads x L^2 per sequence; the softmax backward holds about 10 such tensors at once
      (counted with torch.autograd.graph.saved_tensors_hooks and torch's profiler, torch 2.13)
The CPU numbers are checked against measured peaks (tests/unit/test_planner.py); the GPU ones
against torch.cuda.max_memory_allocated when a GPU run confirms them (docs/learner.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from megatron_s2lpo.config.learner import LearnerConfig
from megatron_s2lpo.config.model import ModelArch

GIB = 1024**3
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp8": 2}  # parameter / activation dtype (fp8 keeps bf16 masters)


@dataclass(frozen=True, kw_only=True, slots=True)
class Backend:
    """What one kind of machine keeps per token (module docstring)."""

    name: str
    act_h: float  # activation elements per token and layer, per hidden / q / kv / ffn width
    act_q: float
    act_kv: float
    act_f: float
    saves_attention_probs: bool  # the attention kernel keeps heads x L^2 probabilities
    attention_backward_probs: float  # probability-sized tensors alive in the softmax backward
    overhead_bytes: int
    fragmentation: float  # share of the dynamic memory lost to the caching allocator


GPU = Backend(name="gpu", act_h=4, act_q=3, act_kv=3, act_f=3, saves_attention_probs=False,
              attention_backward_probs=0, overhead_bytes=3 * GIB, fragmentation=0.10)
CPU = Backend(name="cpu", act_h=6, act_q=7, act_kv=5, act_f=5, saves_attention_probs=True,
              attention_backward_probs=10, overhead_bytes=0, fragmentation=0.0)


@dataclass(frozen=True, kw_only=True, slots=True)
class Item:
    name: str
    bytes: float
    note: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class LearnerMemory:
    """One learner GPU's memory: the items and the peak of a step."""

    items: tuple[Item, ...]
    peak: float  # bytes
    peak_phase: str  # "training step" or "reference pass"
    stage: str  # which pipeline stage is the largest

    def item(self, name: str) -> float:
        return next(i.bytes for i in self.items if i.name == name)


def layer_params(arch: ModelArch) -> tuple[int, int]:
    """(matmul weights, norm / bias weights) of one transformer layer, unsharded."""
    q_dim, kv_dim, h = arch.num_attention_heads * arch.head_dim, arch.num_query_groups * arch.head_dim, arch.hidden_size
    matmul = h * (q_dim + 2 * kv_dim) + q_dim * h + 3 * h * arch.ffn_hidden_size
    small = 2 * h + (2 * arch.head_dim if arch.qk_layernorm else 0) + ((q_dim + 2 * kv_dim) if arch.add_qkv_bias else 0)
    return matmul, small


def stage_params(arch: ModelArch, tp: int, pp: int, stage: int) -> tuple[float, float]:
    """(all params, linear-layer params) held by one TP rank of pipeline `stage`."""
    matmul, small = layer_params(arch)
    layers = arch.num_layers / pp
    embed = arch.padded_vocab_size(tp) * arch.hidden_size / tp
    linear = layers * matmul / tp
    total = linear + layers * small
    if stage == 0:
        total += embed
    if stage == pp - 1:
        total += arch.hidden_size  # final norm
        if not arch.tie_word_embeddings or pp > 1:  # the last stage's own output layer (or copy)
            total += embed
            linear += embed
    return total, linear


def _per_token_layer_bytes(arch: ModelArch, cfg: LearnerConfig, backend: Backend) -> float:
    """Activation bytes one token leaves for the backward in one layer, on one TP rank."""
    tp = cfg.tensor_parallel_size
    d = DTYPE_BYTES[cfg.precision] if backend.name == "gpu" else 4
    q_dim, kv_dim = arch.num_attention_heads * arch.head_dim, arch.num_query_groups * arch.head_dim
    h_share = arch.hidden_size / (tp if cfg.sequence_parallel else 1)
    terms = {"h": backend.act_h * h_share, "q": backend.act_q * q_dim / tp, "kv": backend.act_kv * kv_dim / tp,
             "f": backend.act_f * arch.ffn_hidden_size / tp}
    modules = set(cfg.recompute_modules or ["core_attn"]) if cfg.recompute_granularity == "selective" else set()
    if "core_attn" in modules:
        terms["q"] -= q_dim / tp  # the attention output is recomputed
    if "mlp" in modules:
        terms["f"] = 0.0
        terms["h"] -= h_share  # only the MLP's input is kept
    if "layernorm" in modules:
        terms["h"] -= h_share  # norm outputs recomputed
    total = sum(terms.values()) * d
    if cfg.precision == "fp8" and backend.name == "gpu":  # TE keeps the linears' inputs in FP8
        total -= (2 * h_share + q_dim / tp + arch.ffn_hidden_size / tp) * (d - 1)
    return total


def activation_bytes(arch: ModelArch, cfg: LearnerConfig, backend: Backend, max_seq_len: int) -> tuple[float, float]:
    """(activations kept over one stage's micro-batches in flight, transient of the attention
    backward) on the first pipeline stage of one rank."""
    tokens = cfg.micro_batch_tokens / cfg.context_parallel_size
    longest = min(max_seq_len, cfg.micro_batch_tokens) / cfg.context_parallel_size
    per_layer = tokens * _per_token_layer_bytes(arch, cfg, backend)
    heads = arch.num_attention_heads / cfg.tensor_parallel_size
    selective_attn = cfg.recompute_granularity == "selective" and "core_attn" in (cfg.recompute_modules or ["core_attn"])
    probs = 0.0
    if backend.saves_attention_probs and not selective_attn:
        probs = heads * longest * tokens * 4  # sum of L_i^2 over the pack, worst case (all longest)
    transient = backend.attention_backward_probs * heads * longest * longest * 4
    layers = arch.num_layers  # 1F1B: the first stage keeps pp micro-batches of L/pp layers
    pp, vpp = cfg.pipeline_parallel_size, cfg.effective_vpp_size
    in_flight = 1.0 + ((pp - 1) / (pp * vpp) if vpp else 0.0)
    layer_input = tokens * arch.hidden_size / (cfg.tensor_parallel_size if cfg.sequence_parallel else 1) * (
        DTYPE_BYTES[cfg.precision] if backend.name == "gpu" else 4)
    if cfg.recompute_granularity == "full":
        group = cfg.recompute_num_layers
        if cfg.recompute_method == "uniform":  # inputs of every group, one group recomputed at a time
            kept = math.ceil(layers / group) * layer_input + group * (per_layer + probs)
        else:  # block: the first `group` layers per stage are recomputed, the rest kept
            kept = group * layer_input + max(layers - group * pp, 0) * (per_layer + probs) + per_layer + probs
        return kept * in_flight, transient
    return layers * (per_layer + probs) * in_flight, transient


def head_bytes(arch: ModelArch, cfg: LearnerConfig, backend: Backend) -> tuple[float, float]:
    """(training-pass, no-grad-pass) bytes of the chunked output-layer log-prob computation."""
    tp = cfg.tensor_parallel_size
    vocab = arch.padded_vocab_size(tp) / tp
    d = DTYPE_BYTES[cfg.precision] if backend.name == "gpu" else 4
    rows = cfg.logprob_chunk_tokens or cfg.micro_batch_tokens
    train_rows = min(rows, cfg.micro_batch_tokens)
    lp_rows = min(rows, cfg.logprob_tokens)
    # bf16 logits + fp32 shifted logits + fp32 exp / probabilities + fp32 grad + grad logits
    train = train_rows * vocab * (d + 12) + (0 if cfg.gradient_accumulation_fusion else 2) * vocab * arch.hidden_size * d
    hidden = cfg.micro_batch_tokens * arch.hidden_size * (4 + 2 * d)  # fp32 final states, gathered rows, grads
    no_grad = lp_rows * vocab * (d + 8) + cfg.logprob_tokens * arch.hidden_size * (4 + d)
    return train + hidden, no_grad


def estimate_learner(arch: ModelArch, cfg: LearnerConfig, *, dp_size: int, max_seq_len: int,
                     with_reference: bool, backend: Backend = GPU) -> LearnerMemory:
    """The memory of the busiest learner rank (module docstring)."""
    tp, pp = cfg.tensor_parallel_size, cfg.pipeline_parallel_size
    d = DTYPE_BYTES[cfg.precision]
    best: LearnerMemory | None = None
    for stage in sorted({0, pp - 1}):
        params, linear = stage_params(arch, tp, pp, stage)
        weights = params * d + (2 * linear if cfg.precision == "fp8" else 0)
        grads = params * 4
        opt_per_param = (0 if cfg.precision == "fp32" else 4) + 8
        optim = params * opt_per_param / (dp_size * cfg.context_parallel_size if cfg.optim.use_distributed_optimizer
                                          else 1)
        if cfg.optim.cpu_offload:
            optim *= 1 - cfg.optim.cpu_offload_fraction
        acts, attn_transient = activation_bytes(arch, cfg, backend, max_seq_len)
        if stage != 0:  # the last stage keeps one micro-batch of its own layers
            acts = acts / pp
        head_train, head_no_grad = head_bytes(arch, cfg, backend) if stage == pp - 1 else (0.0, 0.0)
        transient = max(head_train, attn_transient)
        reference = params * d if with_reference else 0.0
        resident_ref = 0.0 if cfg.ref_offload else reference
        static = weights + grads + optim + resident_ref
        dynamic = acts + transient
        overhead = backend.overhead_bytes + backend.fragmentation * dynamic
        train_peak = static + dynamic + overhead
        ref_peak = static + (reference - resident_ref) + head_no_grad + overhead
        peak, phase = (train_peak, "training step") if train_peak >= ref_peak else (ref_peak, "reference pass")
        items = (
            Item(name="weights", bytes=weights, note=f"{params / 1e6:,.0f}M params on this rank"),
            Item(name="grads", bytes=grads, note="fp32 DDP buffer"),
            Item(name="optimizer", bytes=optim, note=_optim_note(cfg, dp_size)),
            Item(name="activations", bytes=acts, note=_act_note(cfg)),
            Item(name="log-prob buffers", bytes=transient if stage == pp - 1 else attn_transient,
                 note=f"chunks of {cfg.logprob_chunk_tokens or cfg.micro_batch_tokens} rows"),
            Item(name="reference", bytes=reference, note="host memory, on the device for its pass"
                 if cfg.ref_offload else "resident on the device") if with_reference else None,
            Item(name="overhead", bytes=overhead, note="CUDA/NCCL/TE workspaces + fragmentation"),
        )
        estimate = LearnerMemory(items=tuple(i for i in items if i is not None), peak=peak, peak_phase=phase,
                                 stage="first" if stage == 0 else "last")
        if best is None or estimate.peak > best.peak:
            best = estimate
    return best


def _optim_note(cfg: LearnerConfig, dp_size: int) -> str:
    parts = ["fp32 main + Adam" if cfg.precision != "fp32" else "Adam"]
    if cfg.optim.use_distributed_optimizer:
        parts.append(f"/ DP={dp_size * cfg.context_parallel_size}")
    if cfg.optim.cpu_offload:
        parts.append(f"{cfg.optim.cpu_offload_fraction:.0%} on the host")
    return " ".join(parts)


def _act_note(cfg: LearnerConfig) -> str:
    recompute = cfg.recompute_granularity
    if recompute == "selective":
        recompute += f" {cfg.recompute_modules or ['core_attn']}"
    return (f"{cfg.micro_batch_tokens} tokens, TP={cfg.tensor_parallel_size}"
            f"{' SP' if cfg.sequence_parallel else ''}, CP={cfg.context_parallel_size}, recompute {recompute}")


def with_changes(cfg: LearnerConfig, **changes: object) -> LearnerConfig:
    """A copy of `cfg` with top-level or `optim.`-prefixed fields changed (validated again)."""
    optim = {k[len("optim."):]: v for k, v in changes.items() if k.startswith("optim.")}
    top = {k: v for k, v in changes.items() if not k.startswith("optim.")}
    if optim:
        top["optim"] = replace(cfg.optim, **optim)
    return replace(cfg, **top)
