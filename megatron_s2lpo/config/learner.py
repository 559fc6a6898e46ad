"""Learner section: parallel layout, precision, micro-batching, memory options, optimizer.

The learner (`megatron_s2lpo.learner`) turns these into megatron-core objects
(`TransformerConfig`, `DistributedDataParallelConfig`, `OptimizerConfig`,
`OptimizerParamScheduler`); this module only holds and validates the numbers, so the config
layer never imports megatron. Rules that depend on the machine (a GPU, Transformer Engine, a
Blackwell GPU for mxfp8 / nvfp4) are checked when the learner is built (learner/model.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .base import check
from .rollout import EngineConfig

PRECISIONS = ("fp32", "bf16", "fp8")
FP8_FORMATS = ("hybrid", "e4m3")  # megatron TransformerConfig.fp8
# Current-scaling recipes (TE 2.x names): tensorwise = Float8CurrentScaling, blockwise =
# Float8BlockScaling (Hopper), mxfp8 = MXFP8BlockScaling and nvfp4 = NVFP4BlockScaling (Blackwell).
FP8_RECIPES = ("tensorwise", "blockwise", "mxfp8", "nvfp4")
BLACKWELL_RECIPES = ("mxfp8", "nvfp4")
# Rows (tokens) each quantized GEMM input must be a multiple of, on the rank that runs the GEMM:
# megatron-core's own padding unit (fp8_utils.get_fp8_align_size: 16, mxfp8 32; fp4_utils: nvfp4
# 128), which covers Transformer Engine's assert (8 rows, learner/fp8_rules.py), and for blockwise
# the 128-row tiles TE needs to all-gather FP8 under sequence parallel (else it refuses or, in the
# backward, gathers in BF16). Peers pad the same way (NeMo-RL 16 x TP, 128 x TP for blockwise).
FP8_ROW_ALIGNMENT = {"tensorwise": 16, "blockwise": 128, "mxfp8": 32, "nvfp4": 128}
RECOMPUTE_GRANULARITIES = ("none", "full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
RECOMPUTE_MODULES = ("core_attn", "layernorm", "mlp")  # the dense-model choices of megatron's selective recompute
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")
# Mixture-of-experts learners (docs/learner.md, "Mixture of experts"): megatron's token
# dispatchers (flex = DeepEP, GPU only) and the routing replay modes.
MOE_DISPATCHERS = ("alltoall", "allgather", "flex")
ROUTING_REPLAY = ("none", "r2", "r3")
# TransformerConfig fields the learner sets itself: learner.transformer_overrides may not name them
# (the learner option to use instead, or where the value comes from).
LEARNER_MANAGED_FIELDS = {
    **{name: "the model's config.json (rollout.learner.model_path / init_arch)" for name in (
        "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
        "normalization", "layernorm_epsilon", "gated_linear_unit", "activation_func", "add_bias_linear",
        "add_qkv_bias", "qk_layernorm", "rotary_interleaved")},
    "tensor_model_parallel_size": "learner.tensor_parallel_size",
    "pipeline_model_parallel_size": "learner.pipeline_parallel_size",
    "virtual_pipeline_model_parallel_size": "learner.virtual_pipeline_parallel_size",
    "sequence_parallel": "learner.sequence_parallel", "context_parallel_size": "learner.context_parallel_size",
    **{name: "the model's config.json (num_experts, num_experts_per_tok, moe_intermediate_size, norm_topk_prob)"
       for name in ("num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_router_pre_softmax")},
    **{name: f"learner.{name}" for name in ("expert_model_parallel_size", "expert_tensor_parallel_size",
                                            "moe_grouped_gemm", "moe_aux_loss_coeff")},
    "moe_token_dispatcher_type": "learner.moe_token_dispatcher",
    **{name: "learner.precision / fp8_format / fp8_recipe" for name in (
        "fp8", "fp8_recipe", "fp4", "fp4_recipe", "bf16", "fp16", "params_dtype", "pipeline_dtype")},
    **{name: f"learner.{name}" for name in (
        "recompute_granularity", "recompute_method", "recompute_num_layers", "recompute_modules",
        "gradient_accumulation_fusion")},
    **{name: "the learner (it must match how the learner feeds the model; hidden_dropout / attention_dropout "
       "are 0 for RL log-probs)" for name in ("use_cpu_initialization", "variable_seq_lengths", "batch_p2p_comm",
                                              "batch_p2p_sync", "hidden_dropout", "attention_dropout",
                                              "finalize_model_grads_func", "grad_scale_func", "no_sync_func",
                                              "grad_sync_func", "param_sync_func")},
}
# megatron-core's DistributedOptimizer checkpoint formats the learner offers (optimizer/distrib_optimizer.py):
# dp_reshardable: every DP rank writes its own shard, no gather, loads into any DP size at the same TP / PP;
# fully_reshardable: gathers each TP shard's fp32 params and Adam moments on the DP ranks, loads into any layout.
# (fully_sharded_model_space, which would do both, raises "flattened_range is not supported" in 0.16.1.)
OPTIMIZER_SHARDINGS = ("dp_reshardable", "fully_reshardable")


@dataclass(frozen=True, kw_only=True, slots=True)
class TokenAlignment:
    """What the learner pads to (`token_alignment`).

    sequence  every sequence of a pack is padded to a multiple of this (its padding follows it)
    pack      every micro-batch's token count per row (a pack's total; a padded row's length) is
              a multiple of this: the last sequence's padding grows to reach it
    """

    sequence: int
    pack: int


def token_alignment(*, seq_length_multiple: int = 1, tensor_parallel_size: int = 1, sequence_parallel: bool = False,
                    context_parallel_size: int = 1, precision: str = "fp32", fp8_recipe: str = "tensorwise"
                    ) -> TokenAlignment:
    """The padding a recipe needs, in one place.

    A sequence: `seq_length_multiple`, and 2 x CP with context parallelism (megatron splits every
    THD sequence into 2 x CP load-balanced chunks). A pack's tokens are split over CP ranks, and
    over TP ranks with sequence parallel, before the column-parallel GEMMs; under FP8 each rank's
    share must be a multiple of the recipe's row alignment (FP8_ROW_ALIGNMENT), so the pack total
    is a multiple of CP x (TP with SP) x that alignment (and of the sequence multiple).
    """
    cp = context_parallel_size
    sequence = math.lcm(seq_length_multiple, 2 * cp if cp > 1 else 1)
    shards = cp * (tensor_parallel_size if sequence_parallel else 1)
    rows = FP8_ROW_ALIGNMENT[fp8_recipe] if precision == "fp8" else 1
    return TokenAlignment(sequence=sequence, pack=math.lcm(sequence, shards * rows))


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    """Adam through megatron-core's `get_megatron_optimizer` and its LR scheduler."""

    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # global grad-norm clip; 0 disables clipping
    lr_warmup_steps: int = 0  # optimizer steps of linear warmup from 0 to lr
    lr_decay_steps: int = 0  # optimizer steps until min_lr (0: decay over warmup only = constant)
    lr_decay_style: str = "constant"
    use_distributed_optimizer: bool = False  # ZeRO-1: shard Adam state over data-parallel ranks
    # megatron's optimizer_cpu_offload / optimizer_offload_fraction: Adam state and update on the
    # host for this share of the parameters (HybridDeviceOptimizer; GPU only, distributed optimizer)
    cpu_offload: bool = False
    cpu_offload_fraction: float = 1.0

    def __post_init__(self) -> None:
        check(self.lr > 0, f"learner.optim.lr must be > 0, got {self.lr}")
        check(0 <= self.min_lr <= self.lr,
              f"learner.optim.min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        check(self.weight_decay >= 0, f"learner.optim.weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            check(0 <= value < 1, f"learner.optim.{name} must be in [0, 1), got {value}")
        check(self.adam_eps > 0, f"learner.optim.adam_eps must be > 0, got {self.adam_eps}")
        check(self.clip_grad >= 0, f"learner.optim.clip_grad must be >= 0 (0 = off), got {self.clip_grad}")
        check(self.lr_warmup_steps >= 0,
              f"learner.optim.lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")
        check(self.lr_decay_steps >= 0, f"learner.optim.lr_decay_steps must be >= 0, got {self.lr_decay_steps}")
        check(self.lr_decay_style in LR_DECAY_STYLES,
              f"learner.optim.lr_decay_style must be one of {LR_DECAY_STYLES}, got {self.lr_decay_style!r}")
        check(self.lr_decay_style == "constant" or self.lr_decay_steps > self.lr_warmup_steps,
              f"learner.optim.lr_decay_steps ({self.lr_decay_steps}) must exceed lr_warmup_steps "
              f"({self.lr_warmup_steps}) for lr_decay_style={self.lr_decay_style!r}")
        check(0 < self.cpu_offload_fraction <= 1,
              f"learner.optim.cpu_offload_fraction must be in (0, 1], got {self.cpu_offload_fraction}")
        check(not self.cpu_offload or self.use_distributed_optimizer,
              "learner.optim.cpu_offload needs learner.optim.use_distributed_optimizer=true (megatron's "
              "HybridDeviceOptimizer runs inside the distributed optimizer)")


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """How the learner writes checkpoints (learner/checkpoint.py, docs/learner.md)."""

    optimizer_sharding: str = "dp_reshardable"  # distributed optimizer state: one of OPTIMIZER_SHARDINGS
    # write in a forked process while training continues; committed (renamed, `latest` moved) once
    # every rank's write is done, so a load never sees a partial save
    async_save: bool = False

    def __post_init__(self) -> None:
        check(self.optimizer_sharding in OPTIMIZER_SHARDINGS,
              f"learner.checkpoint.optimizer_sharding must be one of {OPTIMIZER_SHARDINGS}, "
              f"got {self.optimizer_sharding!r}")


@dataclass(kw_only=True, slots=True)
class LearnerConfig:
    """Megatron learner: model parallelism, precision, micro-batching, memory, optimizer."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    virtual_pipeline_parallel_size: int | None = None  # interleaved 1F1B chunks per pipeline rank
    sequence_parallel: bool = False  # shard norms/activations over TP ranks (TE spec, TP > 1)
    context_parallel_size: int = 1  # split every packed sequence over ranks (learner/context_parallel.py)
    # Mixture of experts (Qwen3-MoE): experts spread over expert-parallel ranks (carved out of DP),
    # each expert's weights split over expert tensor-parallel ranks; ignored by dense models.
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int = 1
    moe_token_dispatcher: str = "alltoall"  # alltoall | allgather | flex (DeepEP, GPU)
    moe_grouped_gemm: bool | None = None  # TE grouped GEMM for the experts; None = with the TE spec
    moe_aux_loss_coeff: float = 0.0  # load-balancing loss weight; 0 = off (the RL default)
    # none: the learner routes freely; r2: training forwards replay the routing of the old-log-prob
    # pass; r3: the old-log-prob pass replays the learner engine's routing (and training replays it)
    routing_replay: str = "none"
    routing_metrics_every: int = 10  # steps between routing-agreement / mismatch metrics (0 = never)
    precision: str = "fp32"  # fp32 everywhere on CPU; bf16 / fp8 need CUDA (+ Transformer Engine)
    # blockwise (1 x 128 activation tiles, 128 x 128 weight blocks): a token quantizes the same in
    # any pack, so old log-probs and training agree on-policy (docs/learner.md, "FP8 fit for RL")
    fp8_recipe: str = "blockwise"
    fp8_format: str = "e4m3"  # e4m3 everywhere (peers' blockwise choice) | hybrid: e5m2 gradients
    fp8_fp32_scales: bool = True  # blockwise: fp32 scales, not powers of 2 (NVTE_FP8_BLOCK_SCALING_FP32_SCALES)
    use_te: bool | None = None  # Transformer Engine layer spec; None = when CUDA and TE are present
    pack_sequences: bool = True  # THD packing of whole sequences (False: right-padded rows)
    micro_batch_tokens: int = 4096  # token budget of one micro-batch (sequences are never split)
    logprob_micro_batch_tokens: int = 0  # budget for no-grad log-prob passes; 0 = micro_batch_tokens
    logprob_chunk_tokens: int = 1024  # output-layer rows per chunk of the log-prob pass; 0 = one chunk
    seq_length_multiple: int = 8  # pad every sequence (packed) / micro-batch (padded) to a multiple
    recompute_granularity: str = "none"  # activation recompute: none | full | selective
    recompute_method: str = "uniform"  # for full recompute
    recompute_num_layers: int = 1  # for full recompute
    recompute_modules: list[str] = field(default_factory=list)  # selective; [] = megatron's default core_attn
    overlap_grad_reduce: bool = False  # DP gradient reduce overlapped with the backward (bucketed)
    overlap_param_gather: bool = False  # distributed optimizer: param all-gather overlapped with forward
    gradient_accumulation_fusion: bool = False  # fused wgrad GEMM into main_grad (CUDA + Apex/TE)
    # gradients accumulated over a mini-batch's micro-batches and reduced over DP in fp32 (false:
    # in the parameter dtype, half the buffer and traffic, bf16 sums over many packs)
    grad_reduce_in_fp32: bool = True
    # GPU: PyTorch's expandable segments (every pack has another shape); null: on unless
    # sync.transport=tensor, whose CUDA IPC cannot share them (resolved by RunConfig)
    expandable_segments: bool | None = None
    # any other megatron-core TransformerConfig field, e.g. {fp8_param: true, num_layers_at_start_in_bf16: 1};
    # checked against megatron's own fields when the learner is built (docs/learner.md)
    transformer_overrides: dict[str, Any] = field(default_factory=dict)
    ref_offload: bool = True  # keep the reference model in host memory between its passes (GPU)
    seed: int = 1234
    load: str = ""  # megatron dist checkpoint to initialise from ("" = random / HF weights)
    ref_load: str = ""  # reference model checkpoint ("" = a copy of the initial policy)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        self._check_layout()
        self._check_precision()
        self._check_batching()
        self._check_memory_options()

    def _check_layout(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "context_parallel_size",
                     "expert_model_parallel_size", "expert_tensor_parallel_size"):
            value = getattr(self, name)
            check(value >= 1, f"learner.{name} must be >= 1, got {value}")
        self._check_moe()
        vpp = self.virtual_pipeline_parallel_size
        check(vpp is None or vpp >= 1,
              f"learner.virtual_pipeline_parallel_size must be >= 1 or null, got {vpp}")
        check(vpp is None or vpp == 1 or self.pipeline_parallel_size > 1,
              "learner.virtual_pipeline_parallel_size > 1 needs learner.pipeline_parallel_size > 1")
        check(not self.sequence_parallel or self.tensor_parallel_size > 1,
              "learner.sequence_parallel shards activations over the tensor-parallel ranks: it needs "
              "learner.tensor_parallel_size > 1")
        check(not self.sequence_parallel or self.use_te is not False,
              "learner.sequence_parallel needs the Transformer Engine layer spec (megatron's local spec "
              "has no sequence-parallel norms without Apex); set learner.use_te=null or true")
        check(self.context_parallel_size == 1 or self.pack_sequences,
              "learner.context_parallel_size > 1 needs learner.pack_sequences=true (the learner splits "
              "packed THD sequences over the context-parallel ranks)")

    def _check_moe(self) -> None:
        check(self.moe_token_dispatcher in MOE_DISPATCHERS,
              f"learner.moe_token_dispatcher must be one of {MOE_DISPATCHERS}, got {self.moe_token_dispatcher!r}")
        check(self.moe_aux_loss_coeff >= 0, f"learner.moe_aux_loss_coeff must be >= 0, got {self.moe_aux_loss_coeff}")
        check(self.routing_replay in ROUTING_REPLAY,
              f"learner.routing_replay must be one of {ROUTING_REPLAY}, got {self.routing_replay!r}")
        check(self.routing_metrics_every >= 0,
              f"learner.routing_metrics_every must be >= 0 (0 = never), got {self.routing_metrics_every}")

    def _check_precision(self) -> None:
        check(self.precision in PRECISIONS,
              f"learner.precision must be one of {PRECISIONS}, got {self.precision!r}")
        check(self.fp8_format in FP8_FORMATS,
              f"learner.fp8_format must be one of {FP8_FORMATS}, got {self.fp8_format!r}")
        if self.fp8_recipe == "delayed":
            raise ValueError(
                "learner.fp8_recipe=delayed is not offered: delayed scaling takes its scales from an amax "
                "history that changes between the old-log-prob pass and every training pass, so the PPO "
                "ratio is not 1 even on-policy; use tensorwise or blockwise (current scaling) on Hopper, "
                "mxfp8 or nvfp4 on Blackwell")
        check(self.fp8_recipe in FP8_RECIPES,
              f"learner.fp8_recipe must be one of {FP8_RECIPES}, got {self.fp8_recipe!r}")
        check(self.precision != "fp8" or self.use_te is not False,
              "learner.precision=fp8 needs the Transformer Engine layer spec; set learner.use_te=null or true")

    def _check_batching(self) -> None:
        check(self.micro_batch_tokens >= 1,
              f"learner.micro_batch_tokens must be >= 1, got {self.micro_batch_tokens}")
        check(self.logprob_micro_batch_tokens >= 0,
              f"learner.logprob_micro_batch_tokens must be >= 0 (0 = micro_batch_tokens), "
              f"got {self.logprob_micro_batch_tokens}")
        check(self.logprob_chunk_tokens >= 0,
              f"learner.logprob_chunk_tokens must be >= 0 (0 = one chunk), got {self.logprob_chunk_tokens}")
        check(self.seq_length_multiple >= 1,
              f"learner.seq_length_multiple must be >= 1, got {self.seq_length_multiple}")
        pack = self.token_alignment.pack  # the precision and recipe are valid here (_check_precision)
        for name, tokens in (("micro_batch_tokens", self.micro_batch_tokens),
                             ("logprob_micro_batch_tokens", self.logprob_tokens)):
            check(tokens >= pack,
                  f"learner.{name}={tokens} is smaller than one pack's alignment ({pack} tokens: every "
                  "micro-batch is padded to a multiple of it under this TP / SP / CP / fp8 recipe); raise it")

    def _check_memory_options(self) -> None:
        check(self.recompute_granularity in RECOMPUTE_GRANULARITIES,
              f"learner.recompute_granularity must be one of {RECOMPUTE_GRANULARITIES}, "
              f"got {self.recompute_granularity!r}")
        check(self.recompute_method in RECOMPUTE_METHODS,
              f"learner.recompute_method must be one of {RECOMPUTE_METHODS}, got {self.recompute_method!r}")
        check(self.recompute_num_layers >= 1,
              f"learner.recompute_num_layers must be >= 1, got {self.recompute_num_layers}")
        unknown = sorted(set(self.recompute_modules) - set(RECOMPUTE_MODULES))
        check(not unknown, f"learner.recompute_modules: unknown module(s) {unknown}; choose from {RECOMPUTE_MODULES}")
        check(not self.recompute_modules or self.recompute_granularity == "selective",
              "learner.recompute_modules applies to learner.recompute_granularity=selective only")
        check(not self.overlap_param_gather or (self.optim.use_distributed_optimizer and self.overlap_grad_reduce),
              "learner.overlap_param_gather needs learner.optim.use_distributed_optimizer=true and "
              "learner.overlap_grad_reduce=true (megatron overlaps the distributed optimizer's all-gather)")
        for name, value in self.transformer_overrides.items():
            check(name not in LEARNER_MANAGED_FIELDS,
                  f"learner.transformer_overrides.{name}: the learner sets {name} itself; use "
                  f"{LEARNER_MANAGED_FIELDS.get(name)} instead")
            check(value is None or isinstance(value, (bool, int, float, str, list)),
                  f"learner.transformer_overrides.{name} must be a number, string, boolean or list, got {value!r}")

    @property
    def effective_vpp_size(self) -> int | None:
        """The virtual pipeline size megatron wants: None unless interleaving is on."""
        vpp = self.virtual_pipeline_parallel_size
        return vpp if vpp is not None and vpp > 1 else None

    @property
    def logprob_tokens(self) -> int:
        return self.logprob_micro_batch_tokens or self.micro_batch_tokens

    @property
    def token_alignment(self) -> TokenAlignment:
        """What sequences and packs are padded to under this recipe (`token_alignment`)."""
        return token_alignment(seq_length_multiple=self.seq_length_multiple,
                               tensor_parallel_size=self.tensor_parallel_size, sequence_parallel=self.sequence_parallel,
                               context_parallel_size=self.context_parallel_size, precision=self.precision,
                               fp8_recipe=self.fp8_recipe)


_SGLANG_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}


def engine_precision(engine: EngineConfig) -> str:
    """The precision a rollout engine samples at: the in-process local engine's local_dtype; for an
    SGLang server its `--quantization` (e.g. fp8), else its `--dtype`, else bf16 (`auto` takes
    the checkpoint's dtype, bf16 for the models this project trains)."""
    if engine.backend == "local":
        return {"float32": "fp32", "bfloat16": "bf16"}[engine.local_dtype]
    args = [part for arg in engine.extra_args for part in str(arg).split("=", 1)]
    value = {flag: args[i + 1] for i, flag in enumerate(args[:-1]) if flag in ("--quantization", "--dtype")}
    if "--quantization" in value:
        return value["--quantization"]
    return _SGLANG_DTYPES.get(value.get("--dtype", "auto"), "bf16")


def precision_differs(learner: LearnerConfig, engine: EngineConfig) -> bool:
    """Whether the learner computes its log-probs at another precision than the engine samples."""
    return learner.precision != engine_precision(engine)
