"""Learner section: parallel layout, precision, micro-batching, optimizer and LR schedule.

The learner (`megatron_s2lpo.learner`) turns these into megatron-core objects
(`TransformerConfig`, `OptimizerConfig`, `OptimizerParamScheduler`); this module only holds
and validates the numbers, so the config layer never imports megatron.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import check

PRECISIONS = ("fp32", "bf16", "fp8")
FP8_FORMATS = ("hybrid", "e4m3")  # megatron TransformerConfig.fp8
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")  # megatron TransformerConfig.fp8_recipe
RECOMPUTE_GRANULARITIES = ("none", "full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")


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


@dataclass(kw_only=True, slots=True)
class LearnerConfig:
    """Megatron learner: model parallelism, precision, micro-batching, recompute, optimizer."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    virtual_pipeline_parallel_size: int | None = None  # interleaved 1F1B chunks per pipeline rank
    precision: str = "fp32"  # fp32 everywhere on CPU; bf16 / fp8 need CUDA (+ Transformer Engine)
    fp8_format: str = "hybrid"  # e4m3 forward, e5m2 backward
    fp8_recipe: str = "delayed"
    use_te: bool | None = None  # Transformer Engine layer spec; None = when CUDA and TE are present
    micro_batch_tokens: int = 4096  # token budget of one micro-batch (sequences are never split)
    logprob_micro_batch_tokens: int = 0  # budget for no-grad log-prob passes; 0 = micro_batch_tokens
    seq_length_multiple: int = 8  # pad every micro-batch's length to a multiple of this
    recompute_granularity: str = "none"  # activation recompute: none | full | selective
    recompute_method: str = "uniform"  # for full recompute
    recompute_num_layers: int = 1  # for full recompute
    seed: int = 1234
    load: str = ""  # megatron dist checkpoint to initialise from ("" = random / HF weights)
    ref_load: str = ""  # reference model checkpoint ("" = a copy of the initial policy)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            value = getattr(self, name)
            check(value >= 1, f"learner.{name} must be >= 1, got {value}")
        vpp = self.virtual_pipeline_parallel_size
        check(vpp is None or vpp >= 1,
              f"learner.virtual_pipeline_parallel_size must be >= 1 or null, got {vpp}")
        check(vpp is None or vpp == 1 or self.pipeline_parallel_size > 1,
              "learner.virtual_pipeline_parallel_size > 1 needs learner.pipeline_parallel_size > 1")
        check(self.precision in PRECISIONS,
              f"learner.precision must be one of {PRECISIONS}, got {self.precision!r}")
        check(self.fp8_format in FP8_FORMATS,
              f"learner.fp8_format must be one of {FP8_FORMATS}, got {self.fp8_format!r}")
        check(self.fp8_recipe in FP8_RECIPES,
              f"learner.fp8_recipe must be one of {FP8_RECIPES}, got {self.fp8_recipe!r}")
        check(self.micro_batch_tokens >= 1,
              f"learner.micro_batch_tokens must be >= 1, got {self.micro_batch_tokens}")
        check(self.logprob_micro_batch_tokens >= 0,
              f"learner.logprob_micro_batch_tokens must be >= 0 (0 = micro_batch_tokens), "
              f"got {self.logprob_micro_batch_tokens}")
        check(self.seq_length_multiple >= 1,
              f"learner.seq_length_multiple must be >= 1, got {self.seq_length_multiple}")
        check(self.recompute_granularity in RECOMPUTE_GRANULARITIES,
              f"learner.recompute_granularity must be one of {RECOMPUTE_GRANULARITIES}, "
              f"got {self.recompute_granularity!r}")
        check(self.recompute_method in RECOMPUTE_METHODS,
              f"learner.recompute_method must be one of {RECOMPUTE_METHODS}, got {self.recompute_method!r}")
        check(self.recompute_num_layers >= 1,
              f"learner.recompute_num_layers must be >= 1, got {self.recompute_num_layers}")

    @property
    def effective_vpp_size(self) -> int | None:
        """The virtual pipeline size megatron wants: None unless interleaving is on."""
        vpp = self.virtual_pipeline_parallel_size
        return vpp if vpp is not None and vpp > 1 else None

    @property
    def logprob_tokens(self) -> int:
        return self.logprob_micro_batch_tokens or self.micro_batch_tokens
