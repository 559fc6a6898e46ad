"""megatron-core GPTModel for a `ModelArch` (Qwen3, Qwen2.5, Llama 3), matching Hugging Face.

The config choices mirror the Hugging Face implementations of these families: RMSNorm with the
model's epsilon, SwiGLU MLP (`gated_linear_unit` + SiLU) without biases, QKV bias for Qwen2.5,
per-head RMSNorm on queries and keys for Qwen3 (`qk_layernorm`), grouped-query attention,
non-interleaved RoPE on the full head dimension (HF's `rotate_half`), no dropout, tied or untied
output embedding. The vocabulary is padded to `arch.padded_vocab_size(tp)`; the padded rows'
logits are masked in `logprobs.py` so they never carry probability.

Layer spec (which implementation each layer uses):
  * Transformer Engine (`use_te=True`; default when CUDA and TE are present): needed for FP8,
    sequence and context parallelism. TE fuses each pre-norm into the following linear, so
    parameter names differ. Packed (THD) sequences go to TE's attention as they are.
  * local (megatron-core modules only; the only choice on CPU), with megatron's attention core
    replaced by `attention.PackedDotProductAttention`, which also takes packed sequences.

The output layer of the last pipeline stage can defer its logits (`deferred_logits`): the model
then returns the final hidden states and the caller computes logits for the positions it needs,
in chunks (`OutputHead`), instead of a (tokens x vocab) tensor for every position.

Parameter names of one layer `decoder.layers.{i}.` (i is the index within this pipeline stage):
  local spec                              TE spec
  input_layernorm.weight                  self_attention.linear_qkv.layer_norm_weight
  self_attention.linear_qkv.weight        self_attention.linear_qkv.weight
  self_attention.linear_qkv.bias (qwen2)  self_attention.linear_qkv.bias (qwen2)
  self_attention.q_layernorm.weight       self_attention.q_layernorm.weight     (qwen3)
  self_attention.k_layernorm.weight       self_attention.k_layernorm.weight     (qwen3)
  self_attention.linear_proj.weight       self_attention.linear_proj.weight
  pre_mlp_layernorm.weight                mlp.linear_fc1.layer_norm_weight
  mlp.linear_fc1.weight                   mlp.linear_fc1.weight   ([gate; up] per TP shard)
  mlp.linear_fc2.weight                   mlp.linear_fc2.weight
Mixture-of-experts layers (Qwen3-MoE) replace the MLP by megatron's MoELayer: a TopKRouter
(`mlp.router.weight`, top-k over the expert logits in fp32, softmax over the chosen k when the
model renormalises them, HF's norm_topk_prob; softmax over all experts otherwise), the alltoall
token dispatcher (dropless: no capacity factor) and the experts: SequentialMLP
(`mlp.experts.local_experts.{e}.linear_fc{1,2}.weight`, e local to this expert-parallel rank)
on the local spec and on the TE spec without grouped GEMM, TEGroupedMLP (`mlp.experts.linear_fc1.weight{e}`)
with it. `pre_mlp_layernorm.weight` stays a separate norm in MoE layers under both specs.
Outside the layers (both specs): `embedding.word_embeddings.weight` (first stage),
`decoder.final_layernorm.weight` and `output_layer.weight` (last stage; absent when the
embeddings are tied and the first stage is also the last). TE modules add `_extra_state`
entries (FP8 metadata) to `state_dict()`. `linear_qkv` holds, per query group, the group's
query heads followed by its key and value head: [q_g0 ... k_g0, v_g0, q_g1 ...].
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
logger = logging.getLogger(__name__)

from megatron_s2lpo.config.learner import BLACKWELL_RECIPES, MOE_DISPATCHERS
from megatron_s2lpo.config.model import ModelArch

from .parallel import ParallelGroups

# megatron's RotaryEmbedding._apply_scaling takes only `factor`; the other llama3 numbers are fixed.
_MEGATRON_LLAMA3_SCALING = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}


def te_available() -> bool:
    """True when CUDA is present and Transformer Engine's torch binding is installed (not imported)."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def _resolve_use_te(use_te: bool | None, precision: str) -> bool:
    if use_te is None:
        use_te = te_available()
    if use_te and not te_available():
        raise ValueError("learner.use_te=true needs CUDA and transformer_engine; set learner.use_te=null "
                         "(auto) or false on a machine without them")
    if precision == "fp8" and not use_te:
        raise ValueError("learner.precision=fp8 needs the Transformer Engine layer spec (CUDA + "
                         "transformer_engine); use precision fp32 or bf16 without it")
    if precision != "fp32" and not torch.cuda.is_available():
        raise ValueError(f"learner.precision={precision!r} needs CUDA; use learner.precision=fp32 on CPU")
    if use_te:
        from megatron_s2lpo.utils.versions import installed_problems

        for problem in installed_problems():  # the image's build refuses these; elsewhere: say so
            logger.warning("Transformer Engine / megatron-core versions: %s", problem)
    return use_te


def check_spec_options(use_te: bool, *, sequence_parallel: bool = False, context_parallel_size: int = 1,
                       gradient_accumulation_fusion: bool = False) -> None:
    """Options the local layer spec or this machine cannot run, refused with the reason."""
    if sequence_parallel and not use_te:
        raise ValueError("learner.sequence_parallel needs the Transformer Engine layer spec: megatron's local "
                         "spec has no sequence-parallel layer norms (without Apex); this learner builds the local "
                         "spec (no CUDA or no transformer_engine here, or learner.use_te=false)")
    if gradient_accumulation_fusion and not (torch.cuda.is_available()
                                             and importlib.util.find_spec("fused_weight_gradient_mlp_cuda")):
        raise ValueError("learner.gradient_accumulation_fusion needs CUDA and Apex's fused_weight_gradient_mlp_cuda "
                         "extension (megatron's output layer uses it; the NGC PyTorch image ships it); set it false")


def fp8_support_error(recipe: str, capability: tuple[int, int], cuda_version: str | None) -> str | None:
    """Why `recipe` cannot run on a GPU of compute `capability` with this CUDA, or None.

    Transformer Engine 2.x's rules (transformer_engine/pytorch/quantization.py): current
    scaling (tensorwise) needs sm_89+, blockwise sm_90+ and CUDA 12.9+, MXFP8 sm_100 to sm_11x,
    NVFP4 sm_100+ (Blackwell).
    """
    name = f"sm_{capability[0]}{capability[1]}"
    cuda = tuple(int(x) for x in (cuda_version or "0.0").split(".")[:2])
    if recipe in BLACKWELL_RECIPES and not (capability >= (10, 0) and (recipe == "nvfp4" or capability < (12, 0))):
        return (f"learner.fp8_recipe={recipe} needs a Blackwell GPU (compute capability 10.x); this GPU is {name}: "
                "use fp8_recipe=tensorwise or blockwise on Hopper")
    if recipe == "blockwise" and not (capability >= (9, 0) and cuda >= (12, 9)):
        return (f"learner.fp8_recipe=blockwise needs compute capability 9.0+ and CUDA 12.9+; this is {name} with "
                f"CUDA {cuda_version}: use fp8_recipe=tensorwise")
    if recipe == "tensorwise" and capability < (8, 9):
        return f"learner.fp8_recipe=tensorwise needs compute capability 8.9+ (Ada, Hopper); this GPU is {name}"
    return None


def _check_fp8_device(recipe: str) -> None:
    if not torch.cuda.is_available():
        return  # _resolve_use_te already refused fp8 without CUDA
    error = fp8_support_error(recipe, torch.cuda.get_device_capability(), torch.version.cuda)
    if error:
        raise ValueError(error)


FP32_SCALES_ENV = "NVTE_FP8_BLOCK_SCALING_FP32_SCALES"


def apply_fp8_scale_environment(fp32_scales: bool) -> None:
    """Make Transformer Engine's blockwise recipe use fp32 (or power-of-2) scales.

    TE reads NVTE_FP8_BLOCK_SCALING_FP32_SCALES once, when it defines `Float8BlockScaling`
    (transformer_engine/common/recipe/__init__.py:332 in 2.9.0, a class attribute), so it must be
    set before anything imports TE; if TE was imported already with the other value, refuse.
    """
    want = "1" if fp32_scales else "0"
    recipe = sys.modules.get("transformer_engine.common.recipe")
    if recipe is None:
        os.environ[FP32_SCALES_ENV] = want
        return
    if bool(recipe.Float8BlockScaling.use_f32_scales) != fp32_scales:
        raise ValueError(
            f"learner.fp8_fp32_scales={str(fp32_scales).lower()} but Transformer Engine was imported before the "
            f"learner with {FP32_SCALES_ENV}={os.environ.get(FP32_SCALES_ENV, 'unset')} (it reads the variable once, "
            f"at import): export {FP32_SCALES_ENV}={want} in the trainer's environment, or set "
            f"learner.fp8_fp32_scales={str(not fp32_scales).lower()}")


def rope_scaling_factor(arch: ModelArch) -> float | None:
    """The llama3 RoPE scaling factor megatron applies, or None; ValueError if megatron cannot express it."""
    if arch.rope_scaling is None:
        return None
    scaling = dict(arch.rope_scaling)
    for key, value in _MEGATRON_LLAMA3_SCALING.items():
        if float(scaling.get(key, value)) != value:
            raise ValueError(
                f"model.rope_scaling.{key}={scaling[key]} is not supported: megatron-core's llama3 "
                f"RoPE scaling fixes {key}={value} (supported: {_MEGATRON_LLAMA3_SCALING} with any factor)"
            )
    return float(scaling["factor"])


def transformer_config(
    arch: ModelArch,
    groups: ParallelGroups,
    *,
    precision: str = "fp32",
    use_te: bool = False,
    fp8_format: str = "e4m3",
    fp8_recipe: str = "blockwise",
    recompute_granularity: str | None = None,
    recompute_method: str = "uniform",
    recompute_num_layers: int = 1,
    recompute_modules: list[str] | None = None,
    sequence_parallel: bool = False,
    gradient_accumulation_fusion: bool = False,
    moe_token_dispatcher: str = "alltoall",
    moe_grouped_gemm: bool | None = None,
    moe_aux_loss_coeff: float = 0.0,
    transformer_overrides: dict[str, Any] | None = None,
    **overrides: Any,
) -> Any:
    """The megatron `TransformerConfig` of `arch` under the layout of `groups` (see module doc).

    use_te: whether the layers will use the Transformer Engine spec (enables TE's fused RoPE).
    fp8_recipe: tensorwise / blockwise / mxfp8 (megatron fp8_recipe) or nvfp4 (megatron fp4).
    recompute_modules: selective recompute's modules (None / []: megatron's default core_attn).
    moe_*: mixture-of-experts settings (`moe_settings`); ignored for dense models.
    transformer_overrides: learner.transformer_overrides, checked by `check_transformer_overrides`.
    overrides: any other TransformerConfig field (internal callers and tests).
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    if precision not in PRECISION_DTYPES:
        raise ValueError(f"learner.precision must be one of {sorted(PRECISION_DTYPES)}, got {precision!r}")
    check_spec_options(use_te, sequence_parallel=sequence_parallel, context_parallel_size=groups.cp_size,
                       gradient_accumulation_fusion=gradient_accumulation_fusion)
    _check_divisible(arch, groups)
    dtype = PRECISION_DTYPES[precision]
    on_cpu = not torch.cuda.is_available()
    recompute = None if recompute_granularity in (None, "none") else recompute_granularity
    kwargs: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.add_qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        rotary_interleaved=False,  # HF rotate_half layout
        apply_rope_fusion=use_te,  # fused RoPE kernel needs TE; same math as the unfused one
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=groups.tp_size,
        pipeline_model_parallel_size=groups.pp_size,
        virtual_pipeline_model_parallel_size=groups.vpp_size,
        sequence_parallel=sequence_parallel,
        context_parallel_size=groups.cp_size,
        gradient_accumulation_fusion=gradient_accumulation_fusion,
        params_dtype=dtype,
        pipeline_dtype=dtype,  # dtype of p2p activations; megatron requires it with PP
        bf16=precision in ("bf16", "fp8"),
        use_cpu_initialization=on_cpu,
        # Token-budget micro-batches differ in shape; the 1F1B schedule then sends each
        # activation's shape before it. megatron exchanges those shapes with batched p2p, which
        # has the gloo ordering problem below under the interleaved schedule, so with VPP the
        # learner pads a step's micro-batches to one shape instead (batching.py).
        variable_seq_lengths=groups.pp_size > 1 and groups.vpp_size is None,
        # No MoE here; megatron rejects its default MoE dispatcher together with variable lengths.
        moe_token_dispatcher_type="alltoall",
        # gloo matches p2p messages between two ranks in posting order. With PP=2 a batched
        # send_prev + send_next go to the same peer, so an activation can land in a gradient's
        # buffer (interleaved schedule); the unbatched path sends the two directions over two
        # different groups. (batch_p2p_sync is then unused; it is a CUDA-stream barrier.)
        batch_p2p_comm=not on_cpu,
        batch_p2p_sync=not on_cpu,
        recompute_granularity=recompute,
        recompute_method=recompute_method if recompute == "full" else None,
        recompute_num_layers=recompute_num_layers if recompute == "full" else None,
    )
    if recompute == "selective" and recompute_modules:
        kwargs["recompute_modules"] = list(recompute_modules)
    if precision == "fp8":
        kwargs.update(_low_precision_kwargs(fp8_format, fp8_recipe))
    if arch.is_moe:
        kwargs.update(moe_settings(arch, groups, use_te=use_te, dispatcher=moe_token_dispatcher,
                                   grouped_gemm=moe_grouped_gemm, aux_loss_coeff=moe_aux_loss_coeff))
    kwargs.update(overrides)
    if transformer_overrides:
        kwargs.update(check_transformer_overrides(transformer_overrides))
    return TransformerConfig(**kwargs)


def moe_settings(arch: ModelArch, groups: ParallelGroups, *, use_te: bool, dispatcher: str = "alltoall",
                 grouped_gemm: bool | None = None, aux_loss_coeff: float = 0.0) -> dict[str, Any]:
    """megatron's MoE fields for a Qwen3-MoE `arch` (see the module docstring).

    Dropless (no capacity factor: every token reaches its k experts), router in fp32, softmax
    score function with HF's norm_topk_prob as megatron's `moe_router_pre_softmax=False` (top-k of
    the logits, softmax over those k: the renormalised probabilities). aux_loss_coeff 0 turns
    load balancing off (the RL default, docs/learner.md). grouped_gemm None: TE's grouped GEMM
    when the TE spec is used (GPU); the local spec runs SequentialMLP, one GEMM per expert.
    """
    if dispatcher not in MOE_DISPATCHERS:
        raise ValueError(f"learner.moe_token_dispatcher must be one of {MOE_DISPATCHERS}, got {dispatcher!r}")
    if dispatcher == "flex" and not torch.cuda.is_available():
        raise ValueError("learner.moe_token_dispatcher=flex (DeepEP) needs CUDA and the deep_ep package; use "
                         "alltoall on this machine")
    grouped = use_te if grouped_gemm is None else grouped_gemm
    if grouped and not use_te:
        raise ValueError("learner.moe_grouped_gemm needs the Transformer Engine layer spec (TEGroupedMLP); the "
                         "local spec runs one GEMM per expert (SequentialMLP)")
    out: dict[str, Any] = dict(
        num_moe_experts=arch.num_experts,
        moe_router_topk=arch.num_experts_per_tok,
        moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
        moe_router_pre_softmax=not arch.norm_topk_prob,
        moe_router_score_function="softmax",
        moe_router_dtype="fp32",
        moe_token_dispatcher_type=dispatcher,
        moe_grouped_gemm=grouped,
        moe_expert_capacity_factor=None,  # dropless
        moe_router_load_balancing_type="aux_loss" if aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=aux_loss_coeff,
        moe_permute_fusion=False,  # TE's fused permute is a GPU kernel; the unfused path is the same math
        expert_model_parallel_size=groups.ep_size,
        expert_tensor_parallel_size=groups.etp_size,
    )
    if dispatcher == "flex":
        out["moe_enable_deepep"] = True
    return out


def check_transformer_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """learner.transformer_overrides against megatron-core's own TransformerConfig fields (this
    installed release's): an unknown name raises ValueError with the closest field names; one the
    learner sets itself names the learner option (config.learner.LEARNER_MANAGED_FIELDS)."""
    import dataclasses
    import difflib

    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_s2lpo.config.learner import LEARNER_MANAGED_FIELDS

    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    for name in overrides:
        if name in LEARNER_MANAGED_FIELDS:
            raise ValueError(f"learner.transformer_overrides.{name}: the learner sets {name} itself; use "
                             f"{LEARNER_MANAGED_FIELDS[name]} instead")
        if name not in fields:
            close = difflib.get_close_matches(name, sorted(fields), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ValueError(f"learner.transformer_overrides.{name} is not a field of megatron-core's "
                             f"TransformerConfig (megatron.core.transformer.transformer_config){hint}")
    return dict(overrides)


def _check_divisible(arch: ModelArch, groups: ParallelGroups) -> None:
    stages = groups.pp_size * (groups.vpp_size or 1)
    if arch.num_layers % stages:
        raise ValueError(
            f"model.num_layers ({arch.num_layers}) must be divisible by pipeline_parallel_size x "
            f"virtual_pipeline_parallel_size ({stages}) so every pipeline chunk gets whole layers"
        )
    for name, value in (("num_attention_heads", arch.num_attention_heads),
                        ("num_query_groups", arch.num_query_groups)):
        if value % groups.tp_size:
            raise ValueError(f"model.{name} ({value}) must be divisible by learner.tensor_parallel_size "
                             f"({groups.tp_size})")
    if groups.ep_size > 1 or groups.etp_size > 1:
        from megatron_s2lpo.convert.mapping import check_expert_parallel

        check_expert_parallel(arch, groups.ep_size, groups.etp_size)


def _low_precision_kwargs(fp8_format: str, fp8_recipe: str) -> dict[str, Any]:
    """megatron's quantization fields for a recipe, after checking this GPU can run it."""
    _check_fp8_device(fp8_recipe)
    if fp8_recipe == "nvfp4":  # TE's NVFP4BlockScaling goes through megatron's fp4 options
        return {"fp4": "e2m1", "fp4_recipe": "nvfp4"}
    return {"fp8": fp8_format, "fp8_recipe": fp8_recipe}


def layer_spec(arch: ModelArch, *, use_te: bool, grouped_gemm: bool = False) -> Any:
    """Transformer layer ModuleSpec: TE modules (GPU) or megatron-core local modules whose
    attention core also takes packed sequences (attention.py); MoE layers for a MoE `arch`."""
    from megatron.core.models.gpt import gpt_layer_specs

    from .attention import packed_core_attention_class

    experts = arch.num_experts or None
    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=experts, moe_grouped_gemm=grouped_gemm, qk_layernorm=arch.qk_layernorm)
    spec = gpt_layer_specs.get_gpt_layer_local_spec(num_experts=experts, qk_layernorm=arch.qk_layernorm,
                                                    normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = packed_core_attention_class()
    return spec


def build_gpt_model(
    arch: ModelArch,
    groups: ParallelGroups,
    *,
    precision: str = "fp32",
    use_te: bool | None = None,
    vp_stage: int | None = None,
    config: Any = None,
    **config_kwargs: Any,
) -> Any:
    """One megatron `GPTModel` chunk of `arch` for this rank (pipeline stage / virtual stage).

    pre_process (embedding) and post_process (final norm + output layer) follow the pipeline rank
    and `vp_stage`. config: a ready `TransformerConfig` (else built by `transformer_config` from
    `precision` and `config_kwargs`, e.g. recompute_granularity="full"). Returns the bare model
    (no DDP / Float16Module wrapper) on `groups.device`, fp32 or bf16 parameters per precision.
    The logits it returns are vocab-parallel: (T, B, padded_vocab / tp) per TP rank.
    """
    from megatron.core.models.gpt.gpt_model import GPTModel

    use_te = _resolve_use_te(use_te, precision)
    if config is None:
        config = transformer_config(arch, groups, precision=precision, use_te=use_te, **config_kwargs)
    elif config_kwargs:
        raise ValueError(f"pass either config or config keywords, not both: {sorted(config_kwargs)}")
    vpp = groups.vpp_size
    if (vpp is None) != (vp_stage is None) or (vpp is not None and not 0 <= vp_stage < vpp):
        raise ValueError(f"vp_stage={vp_stage} does not fit virtual_pipeline_parallel_size={vpp}: pass "
                         "vp_stage in [0, vpp) with interleaving and None without (or use build_model_chunks)")
    pre_process = groups.is_first_stage and (vp_stage is None or vp_stage == 0)
    post_process = groups.is_last_stage and (vp_stage is None or vp_stage == vpp - 1)
    factor = rope_scaling_factor(arch)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(arch, use_te=use_te, grouped_gemm=bool(config.moe_grouped_gemm)),
        vocab_size=arch.padded_vocab_size(groups.tp_size),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,  # keep logits vocab-parallel; logprobs.py reduces over TP
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=arch.rope_theta,
        rope_scaling=factor is not None,
        rope_scaling_factor=factor if factor is not None else 8.0,
        vp_stage=vp_stage,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if precision != "fp32":
        model.to(PRECISION_DTYPES[precision])
    if post_process:
        _install_logit_deferral(model.output_layer)
    return model


def build_model_chunks(
    arch: ModelArch,
    groups: ParallelGroups,
    *,
    precision: str = "fp32",
    use_te: bool | None = None,
    config: Any = None,
    **config_kwargs: Any,
) -> list[Any]:
    """All model chunks of this rank: one per virtual pipeline stage (a single one without VPP).

    The chunks share one TransformerConfig (megatron's interleaved schedule reads it from the
    first chunk); config_kwargs go to `transformer_config` as in `build_gpt_model`.
    """
    use_te = _resolve_use_te(use_te, precision)
    if config is None:
        config = transformer_config(arch, groups, precision=precision, use_te=use_te, **config_kwargs)
    elif config_kwargs:
        raise ValueError(f"pass either config or config keywords, not both: {sorted(config_kwargs)}")
    stages = [None] if groups.vpp_size is None else list(range(groups.vpp_size))
    return [build_gpt_model(arch, groups, precision=precision, use_te=use_te, vp_stage=stage, config=config)
            for stage in stages]


def _install_logit_deferral(layer: Any) -> None:
    """Give the output layer a switch: while `layer.defer_logits` is set, its forward returns the
    hidden states it was given (gathered from the sequence-parallel region) instead of logits.
    GPTModel then returns those (b, s, h) hidden states; `OutputHead` computes logits later.
    megatron's own inference path gathers the same way before its last-token logits."""
    compute = layer.forward  # the bound ColumnParallelLinear.forward

    def forward(input_: Any, weight: Any = None, runtime_gather_output: Any = None) -> Any:
        if not layer.defer_logits:
            return compute(input_, weight=weight, runtime_gather_output=runtime_gather_output)
        if layer.sequence_parallel:
            from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

            # backward: take this rank's slice (the logits' dgrad is all-reduced in OutputHead)
            input_ = gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=False,
                                                          group=layer.tp_group)
        return input_, None

    layer.defer_logits = False
    layer.compute_logits = compute
    layer.forward = forward


@contextlib.contextmanager
def deferred_logits(chunks: list[Any]) -> Iterator[None]:
    """While active, the last stage's model chunk returns final hidden states, not logits."""
    layers = [unwrap_model(c).output_layer for c in chunks if getattr(unwrap_model(c), "post_process", False)]
    for layer in layers:
        layer.defer_logits = True
    try:
        yield
    finally:
        for layer in layers:
            layer.defer_logits = False


class OutputHead:
    """Logits of chosen hidden states through a last-stage chunk's output layer.

    head(hidden (n, h)) -> (n, V_local) vocab-parallel logits, the same as the model's output
    layer gives for those positions: tied embeddings use the embedding weight, inputs are cast
    to the weight's dtype (Float16Module hands fp32 outputs back), and with sequence parallel the
    layer runs as plain tensor parallel (its dgrad all-reduced over TP) because the hidden
    states were gathered."""

    def __init__(self, chunk: Any) -> None:
        self.model = unwrap_model(chunk)
        self.layer = self.model.output_layer

    def __call__(self, hidden: Tensor) -> Tensor:
        weight = (self.model.shared_embedding_or_output_weight()
                  if self.model.share_embeddings_and_output_weights else None)
        dtype = (weight if weight is not None else self.layer.weight).dtype
        layer, saved = self.layer, (self.layer.sequence_parallel, self.layer.allreduce_dgrad)
        if layer.sequence_parallel:
            layer.sequence_parallel = False
            layer.allreduce_dgrad = layer.tp_group.size() > 1
        try:
            logits, _ = layer.compute_logits(hidden.to(dtype).unsqueeze(1), weight=weight)  # [s, b=1, h] in
        finally:
            layer.sequence_parallel, layer.allreduce_dgrad = saved
        return logits.squeeze(1)


def unwrap_model(model: Any) -> Any:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model
