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
               learner.ref_offload (then pinned host memory: planner/host.py)
  weight sync  the flat buffer the weight sync packs HF tensors into (min(sync.bucket_bytes, the
               model), at least the largest tensor; kept between syncs) and, while a sync runs, the
               largest tensor gathered over TP (its shards and the concatenation)
  checkpoint   what a save allocates on the device: nothing for dp_reshardable (each rank's shards
               are views, staged to host memory), one DDP bucket all-gathered over DP in fp32 for
               fully_reshardable (the whole buffer without overlap_grad_reduce)
  fixed        CUDA context, NCCL communicators (one per parallel group the rank uses), cuBLAS / TE
               workspaces: assumptions until a GPU run measures them (benchmarks/gpu_learner_check.py)
  fragment.    the caching allocator's loss, a share of the training step's dynamic memory

The peak is the largest of four phases, each on top of the resident items (weights, grads,
optimizer, a resident reference, the weight-sync buffer, fixed, fragmentation): the training step
(activations + the largest transient at the start of the backward: the log-prob chunk's buffers
or, for kernels that keep softmax probabilities, the attention backward), the reference pass
(the reference's weights + the no-grad log-prob buffers), a checkpoint save and a weight sync.

The per-token activation counts come from reading what megatron-core 0.16's layers save:
  gpu (TE spec, FlashAttention / cuDNN fused attention, bf16): 4h (two norm inputs and outputs)
      + 3q (qk-norm input, RoPE output, attention output) + 3kv + 3f (SwiGLU input 2f, fc2 input f).
      Selective recompute of core_attn saves none of it here: the checkpoint keeps the fused
      kernel's inputs (q, k, v) and linear_proj keeps its output, so it only adds an attention
      forward (the planner says so and suggests full recompute)
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
    cuda_context_bytes: float  # the CUDA context and torch's kernels (lazy loading)
    nccl_bytes_per_group: float  # one NCCL communicator's buffers
    workspace_bytes: float  # cuBLAS / cuBLASLt / TE workspaces
    fragmentation: float  # share of the dynamic memory lost to the caching allocator

    def fixed_bytes(self, cfg: LearnerConfig, dp_size: int) -> dict[str, float]:
        groups = sum((cfg.tensor_parallel_size > 1, dp_size > 1, cfg.context_parallel_size > 1,
                      2 * (cfg.pipeline_parallel_size > 1)))  # PP: the pipeline and the embedding group
        return {"cuda context": self.cuda_context_bytes, "nccl": groups * self.nccl_bytes_per_group,
                "workspaces": self.workspace_bytes}


GPU = Backend(name="gpu", act_h=4, act_q=3, act_kv=3, act_f=3, saves_attention_probs=False,
              attention_backward_probs=0, cuda_context_bytes=0.6 * GIB, nccl_bytes_per_group=0.5 * GIB,
              workspace_bytes=0.5 * GIB, fragmentation=0.10)
CPU = Backend(name="cpu", act_h=6, act_q=7, act_kv=5, act_f=5, saves_attention_probs=True,
              attention_backward_probs=10, cuda_context_bytes=0, nccl_bytes_per_group=0, workspace_bytes=0,
              fragmentation=0.0)


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
    peak_phase: str  # the phase of the peak (`phases`)
    stage: str  # which pipeline stage is the largest
    phases: tuple[tuple[str, float], ...] = ()  # (phase, its peak): training step, reference pass, ...

    def item(self, name: str) -> float:
        """Bytes of item `name` (0 when it is not on this rank, e.g. a checkpoint save that allocates nothing)."""
        return next((i.bytes for i in self.items if i.name == name), 0.0)

    def phase(self, name: str) -> float:
        return dict(self.phases)[name]


def layer_params(arch: ModelArch) -> tuple[int, int]:
    """(matmul weights split over TP, norm / bias / router weights) of one transformer layer,
    unsharded; a mixture-of-experts layer's experts are not in it (`expert_params`)."""
    q_dim, kv_dim, h = arch.num_attention_heads * arch.head_dim, arch.num_query_groups * arch.head_dim, arch.hidden_size
    mlp = 0 if arch.is_moe else 3 * h * arch.ffn_hidden_size
    matmul = h * (q_dim + 2 * kv_dim) + q_dim * h + mlp
    small = 2 * h + (2 * arch.head_dim if arch.qk_layernorm else 0) + ((q_dim + 2 * kv_dim) if arch.add_qkv_bias else 0)
    small += arch.num_experts * h  # the MoE router, replicated on every rank
    return matmul, small


def expert_params(arch: ModelArch, pp: int, ep: int = 1, etp: int = 1) -> float:
    """Expert weights one rank holds: its stage's layers, num_experts / EP experts each, split over ETP."""
    per_layer = arch.num_experts * 3 * arch.hidden_size * arch.moe_ffn_hidden_size
    return arch.num_layers / pp * per_layer / (ep * etp)


def stage_params(arch: ModelArch, tp: int, pp: int, stage: int, *, ep: int = 1, etp: int = 1) -> tuple[float, float]:
    """(all params, linear-layer params) held by one TP rank of pipeline `stage` (with its share of
    a mixture-of-experts model's experts over EP x expert-TP)."""
    matmul, small = layer_params(arch)
    layers = arch.num_layers / pp
    embed = arch.padded_vocab_size(tp) * arch.hidden_size / tp
    linear = layers * matmul / tp + expert_params(arch, pp, ep, etp)
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
    if arch.is_moe:  # k routed copies of the token through one expert's SwiGLU each (split over
        # expert-TP), plus the permuted / dispatched copies of its hidden state the alltoall keeps
        k = arch.num_experts_per_tok
        terms["f"] = backend.act_f * k * arch.moe_ffn_hidden_size / cfg.expert_tensor_parallel_size
        terms["h"] += 2 * k * arch.hidden_size
        terms["router"] = 2 * arch.num_experts  # fp32 router logits and probabilities
    modules = set(cfg.recompute_modules or ["core_attn"]) if cfg.recompute_granularity == "selective" else set()
    if "core_attn" in modules and backend.saves_attention_probs:
        terms["q"] -= q_dim / tp  # the math kernel's output is recomputed (the fused kernel's is kept: docstring)
    if "mlp" in modules:
        terms["f"] = 0.0
        terms.pop("router", None)
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
                     with_reference: bool, backend: Backend = GPU, sync_bucket_bytes: int = 0) -> LearnerMemory:
    """The memory of the busiest learner rank (module docstring). sync_bucket_bytes: the weight
    sync's bucket (sync.bucket_bytes; 0: no weight sync from this learner)."""
    best: LearnerMemory | None = None
    for stage in sorted({0, cfg.pipeline_parallel_size - 1}):
        estimate = _stage_estimate(arch, cfg, stage, dp_size=dp_size, max_seq_len=max_seq_len,
                                   with_reference=with_reference, backend=backend, sync_bucket_bytes=sync_bucket_bytes)
        if best is None or estimate.peak > best.peak:
            best = estimate
    return best


def _stage_estimate(arch: ModelArch, cfg: LearnerConfig, stage: int, *, dp_size: int, max_seq_len: int,
                    with_reference: bool, backend: Backend, sync_bucket_bytes: int) -> LearnerMemory:
    tp, pp = cfg.tensor_parallel_size, cfg.pipeline_parallel_size
    d = DTYPE_BYTES[cfg.precision]
    ep, etp = cfg.expert_model_parallel_size, cfg.expert_tensor_parallel_size
    params, linear = stage_params(arch, tp, pp, stage, ep=ep, etp=etp)
    weights = params * d + (2 * linear if cfg.precision == "fp8" else 0)
    grads = params * (4 if cfg.grad_reduce_in_fp32 or cfg.precision == "fp32" else d)
    optim = optimizer_bytes(params, cfg, dp_size, experts=expert_params(arch, pp, ep, etp))
    acts, attn_transient = activation_bytes(arch, cfg, backend, max_seq_len)
    if stage != 0:  # the last stage keeps one micro-batch of its own layers
        acts = acts / pp
    head_train, head_no_grad = head_bytes(arch, cfg, backend) if stage == pp - 1 else (0.0, 0.0)
    transient = max(head_train, attn_transient)
    reference = params * d if with_reference else 0.0
    resident_ref = 0.0 if cfg.ref_offload else reference
    sync_buffer, sync_gather = sync_bytes(arch, sync_bucket_bytes) if backend.name == "gpu" else (0.0, 0.0)
    save = checkpoint_device_bytes(params, cfg, dp_size) if backend.name == "gpu" else 0.0
    fixed = backend.fixed_bytes(cfg, dp_size)
    fragmentation = backend.fragmentation * (acts + transient)
    resident = weights + grads + optim + resident_ref + sync_buffer + sum(fixed.values()) + fragmentation
    phases = (("training step", resident + acts + transient),
              ("reference pass", resident + (reference - resident_ref) + head_no_grad),
              ("checkpoint save", resident + save), ("weight sync", resident + sync_gather))
    phase, peak = max(phases, key=lambda item: item[1])
    items = (
        Item(name="weights", bytes=weights, note=f"{params / 1e6:,.0f}M params on this rank"),
        Item(name="grads", bytes=grads, note=f"{'fp32' if grads == params * 4 else 'bf16'} DDP buffer"),
        Item(name="optimizer", bytes=optim, note=_optim_note(cfg, dp_size)),
        Item(name="activations", bytes=acts, note=_act_note(cfg)),
        Item(name="log-prob buffers", bytes=transient if stage == pp - 1 else attn_transient,
             note=f"chunks of {cfg.logprob_chunk_tokens or cfg.micro_batch_tokens} rows"),
        Item(name="reference", bytes=reference, note="host memory, on the device for its pass"
             if cfg.ref_offload else "resident on the device") if with_reference else None,
        Item(name="weight-sync buffer", bytes=sync_buffer,
             note=f"kept between syncs; a sync gathers +{sync_gather / GIB:.2f} GB (largest tensor over TP)")
        if sync_buffer else None,
        Item(name="checkpoint save", bytes=save, note=f"{cfg.checkpoint.optimizer_sharding}, during a save"),
        *(Item(name=name, bytes=value, note="assumption until measured") for name, value in fixed.items()),
        Item(name="fragmentation", bytes=fragmentation, note=f"{backend.fragmentation:.0%} of the step's dynamic memory"),
    )
    return LearnerMemory(items=tuple(i for i in items if i is not None and (i.bytes or i.name == "activations")),
                         peak=peak, peak_phase=phase, stage="first" if stage == 0 else "last", phases=phases)


def optimizer_bytes(params: float, cfg: LearnerConfig, dp_size: int, *, on_host: bool = False,
                    experts: float = 0.0) -> float:
    """fp32 main weights (bf16 / fp8) + Adam's moments of this rank, on the device (on_host: the
    share optim.cpu_offload moves to the host). experts: the expert weights among `params`, whose
    state the distributed optimizer shards over the expert-data-parallel ranks instead of DP x CP."""
    per_param = (0 if cfg.precision == "fp32" else 4) + 8
    total = params * per_param
    if cfg.optim.use_distributed_optimizer:
        dp_cp = dp_size * cfg.context_parallel_size
        expert_dp = max(dp_cp * cfg.tensor_parallel_size
                        // (cfg.expert_model_parallel_size * cfg.expert_tensor_parallel_size), 1)
        total = (params - experts) * per_param / dp_cp + experts * per_param / expert_dp
    share = cfg.optim.cpu_offload_fraction if cfg.optim.cpu_offload else 0.0
    return total * (share if on_host else 1 - share)


def sync_bytes(arch: ModelArch, bucket_bytes: int) -> tuple[float, float]:
    """(flat bucket kept between syncs, largest HF tensor gathered over TP while syncing), bf16.
    The buffer is min(bucket, the model) but at least the largest tensor (convert/export.py)."""
    if not bucket_bytes:
        return 0.0, 0.0
    largest = arch.vocab_size * arch.hidden_size * 2  # the embedding / output layer
    return max(min(bucket_bytes, arch.num_params() * 2), largest), 2 * largest  # shards + concatenation


def checkpoint_device_bytes(params: float, cfg: LearnerConfig, dp_size: int) -> float:
    """What a checkpoint save allocates on the device (module docstring)."""
    if not cfg.optim.use_distributed_optimizer or cfg.checkpoint.optimizer_sharding == "dp_reshardable":
        return 0.0
    # megatron DDP buckets: one bucket without overlap, else max(40M, 1M x DP) elements (distributed/)
    bucket = params if not cfg.overlap_grad_reduce else min(params, max(40e6, 1e6 * dp_size))
    return bucket * 4 * (1 + 1 / dp_size)  # all-gathered fp32 world bucket + the local shard sent


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
