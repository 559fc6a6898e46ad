"""LearnerConfig validation: defaults are valid, mistakes name the field."""

import pytest

from megatron_s2lpo.config.base import apply_overrides, from_dict
from megatron_s2lpo.config.learner import LearnerConfig, OptimConfig


def test_defaults_and_overrides():
    cfg = LearnerConfig()
    assert cfg.effective_vpp_size is None and cfg.logprob_tokens == cfg.micro_batch_tokens
    data = apply_overrides({}, ["optim.lr=3.0e-6", "tensor_parallel_size=2", "virtual_pipeline_parallel_size=1",
                                "logprob_micro_batch_tokens=8192"])
    cfg = from_dict(LearnerConfig, data, "learner")
    assert cfg.optim.lr == 3e-6 and cfg.tensor_parallel_size == 2
    assert cfg.effective_vpp_size is None and cfg.logprob_tokens == 8192


@pytest.mark.parametrize("kwargs, field", [
    (dict(tensor_parallel_size=0), "learner.tensor_parallel_size"),
    (dict(precision="fp16"), "learner.precision"),
    (dict(fp8_format="e5m2"), "learner.fp8_format"),
    (dict(recompute_granularity="some"), "learner.recompute_granularity"),
    (dict(micro_batch_tokens=0), "learner.micro_batch_tokens"),
    (dict(virtual_pipeline_parallel_size=2), "learner.virtual_pipeline_parallel_size"),
    (dict(optim=dict(lr=0.0)), "learner.optim.lr"),
    (dict(optim=dict(min_lr=1.0)), "learner.optim.min_lr"),
    (dict(optim=dict(lr_decay_style="cosine", lr_warmup_steps=10, lr_decay_steps=5)), "learner.optim.lr_decay_steps"),
    (dict(optim=dict(lr_decay_style="exp")), "learner.optim.lr_decay_style"),
])
def test_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        from_dict(LearnerConfig, kwargs, "learner")


def test_unknown_field_is_rejected():
    with pytest.raises(ValueError, match="learner.optim.learning_rate"):
        from_dict(LearnerConfig, {"optim": {"learning_rate": 1.0}}, "learner")
    assert OptimConfig(lr_decay_style="linear", lr_decay_steps=10).lr_decay_steps == 10


def test_llama3_rope_scaling_survives_transformers5_configs_and_maps_to_megatron():
    transformers = pytest.importorskip("transformers")
    from megatron_s2lpo.config.model import ModelArch
    from megatron_s2lpo.learner.model import rope_scaling_factor

    scaling = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    arch = ModelArch(family="llama", vocab_size=300, hidden_size=64, ffn_hidden_size=128, num_layers=2,
                     num_attention_heads=4, num_query_groups=2, head_dim=16, rope_theta=500000.0,
                     rope_scaling=scaling)
    hf_config = transformers.AutoConfig.for_model(**arch.to_hf_config_dict())  # nests it in rope_parameters
    assert ModelArch.from_hf_config(hf_config) == arch
    assert rope_scaling_factor(arch) == 32.0
    odd = ModelArch(**{**arch.to_dict(), "rope_scaling": {**scaling, "low_freq_factor": 2.0}})
    with pytest.raises(ValueError, match="model.rope_scaling.low_freq_factor"):
        rope_scaling_factor(odd)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CPU-only checks")
def test_precisions_that_need_cuda_are_refused_on_cpu():
    from megatron_s2lpo.learner.model import _resolve_use_te

    assert _resolve_use_te(None, "fp32") is False
    for precision, message in (("bf16", "needs CUDA"), ("fp8", "Transformer Engine")):
        with pytest.raises(ValueError, match=message):
            _resolve_use_te(None, precision)
    with pytest.raises(ValueError, match="learner.use_te"):
        _resolve_use_te(True, "fp32")


@pytest.mark.parametrize("kwargs, message", [
    (dict(fp8_recipe="delayed"), "learner.fp8_recipe=delayed is not offered: delayed scaling .* amax history"),
    (dict(fp8_recipe="fp4"), "learner.fp8_recipe must be one of"),
    (dict(sequence_parallel=True), "learner.sequence_parallel .* learner.tensor_parallel_size > 1"),
    (dict(sequence_parallel=True, tensor_parallel_size=2, use_te=False), "sequence_parallel needs the Transformer"),
    (dict(context_parallel_size=2, pack_sequences=False), "context_parallel_size > 1 needs learner.pack_sequences"),
    (dict(precision="fp8", use_te=False), "learner.precision=fp8 needs the Transformer Engine"),
    (dict(overlap_param_gather=True), "learner.overlap_param_gather needs .*use_distributed_optimizer"),
    (dict(recompute_modules=["attention"]), r"learner.recompute_modules: unknown module\(s\) \['attention'\]"),
    (dict(recompute_modules=["mlp"]), "recompute_modules applies to .*selective only"),
    (dict(logprob_chunk_tokens=-1), "learner.logprob_chunk_tokens"),
    (dict(optim=dict(cpu_offload=True)), "learner.optim.cpu_offload needs learner.optim.use_distributed_optimizer"),
    (dict(optim=dict(cpu_offload_fraction=0.0)), "learner.optim.cpu_offload_fraction"),
])
def test_memory_and_precision_options_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        from_dict(LearnerConfig, kwargs, "learner")


def test_fp8_recipes_follow_transformer_engines_hardware_rules():
    from megatron_s2lpo.learner.model import fp8_support_error

    hopper, blackwell, ada, ampere = (9, 0), (10, 0), (8, 9), (8, 0)
    assert fp8_support_error("tensorwise", hopper, "12.8") is None
    assert fp8_support_error("blockwise", hopper, "12.9") is None
    assert "CUDA 12.9+" in fp8_support_error("blockwise", hopper, "12.8")
    for recipe in ("mxfp8", "nvfp4"):
        assert f"learner.fp8_recipe={recipe} needs a Blackwell GPU" in fp8_support_error(recipe, hopper, "12.9")
        assert "sm_90" in fp8_support_error(recipe, hopper, "12.9")
        assert fp8_support_error(recipe, blackwell, "12.9") is None
    assert fp8_support_error("mxfp8", (12, 0), "12.9") is not None  # TE: no MXFP8 on sm_120 yet
    assert fp8_support_error("tensorwise", ada, "12.4") is None
    assert "8.9+" in fp8_support_error("tensorwise", ampere, "12.4")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CPU-only checks")
def test_local_spec_refuses_options_it_cannot_run():
    from megatron_s2lpo.learner.model import check_spec_options

    with pytest.raises(ValueError, match="learner.sequence_parallel needs the Transformer Engine layer spec"):
        check_spec_options(False, sequence_parallel=True)
    check_spec_options(False, context_parallel_size=2)  # CP runs in the local spec's attention core
    with pytest.raises(ValueError, match="gradient_accumulation_fusion needs CUDA and Apex"):
        check_spec_options(False, gradient_accumulation_fusion=True)
    check_spec_options(False)


def test_engine_precision_and_the_default_importance_correction():
    from megatron_s2lpo.config import load_config
    from megatron_s2lpo.config.learner import engine_precision
    from megatron_s2lpo.config.rollout import EngineConfig
    from megatron_s2lpo.trainer.loop import importance_correction
    from megatron_s2lpo.types import SOURCE_CODES, Source

    assert engine_precision(EngineConfig()) == "fp32"  # the in-process engine
    assert engine_precision(EngineConfig(backend="sglang")) == "bf16"
    assert engine_precision(EngineConfig(backend="sglang", extra_args=["--dtype", "float16"])) == "fp16"
    assert engine_precision(EngineConfig(backend="sglang", extra_args=["--quantization=fp8"])) == "fp8"
    learner_rows = (SOURCE_CODES[Source.LEARNER],)
    assert importance_correction(load_config(None)) == (None, None)  # fp32 learner, fp32 local engine
    sglang = ["rollout.learner.backend=sglang", "sync.transport=distributed"]
    assert importance_correction(load_config(None, sglang)) == (2.0, learner_rows)  # fp32 learner vs bf16
    assert importance_correction(load_config(None, [*sglang, "learner.precision=bf16"])) == (None, None)
    assert importance_correction(load_config(None, [*sglang, "learner.precision=bf16",
                                                    "algo.precision_correction=true"])) == (2.0, learner_rows)
    assert importance_correction(load_config(None, ["algo.old_logprob=behaviour", "algo.is_threshold=3"])) == (3.0, None)


def test_transformer_overrides_reach_megatron_and_unknown_fields_name_a_suggestion():
    """learner.transformer_overrides: checked against megatron-core's own TransformerConfig fields
    (the installed 0.16.1), applied to the config the learner builds."""
    from megatron_s2lpo.config.model import ModelArch
    from megatron_s2lpo.learner.model import check_transformer_overrides, transformer_config
    from megatron_s2lpo.learner.parallel import ParallelGroups

    assert check_transformer_overrides({"fp8_param": True, "tp_comm_overlap": True, "cpu_offloading": False}) == \
        {"fp8_param": True, "tp_comm_overlap": True, "cpu_offloading": False}  # model-parallel fields too
    with pytest.raises(ValueError, match=r"learner.transformer_overrides.fp8_params is not a field of megatron-core's "
                                         r"TransformerConfig .*did you mean fp8_param\b"):
        check_transformer_overrides({"fp8_params": True})
    with pytest.raises(ValueError, match="learner.transformer_overrides.sequence_parallel: the learner sets "
                                         "sequence_parallel itself; use learner.sequence_parallel instead"):
        check_transformer_overrides({"sequence_parallel": True})
    arch = ModelArch(family="qwen3", vocab_size=300, hidden_size=64, ffn_hidden_size=96, num_layers=2,
                     num_attention_heads=4, num_query_groups=2, head_dim=16, qk_layernorm=True)
    groups = ParallelGroups(tp_group=None, pp_group=None, dp_group=None, dp_group_gloo=None, embedding_group=None,
                            tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, dp_rank=0, dp_size=1, vpp_size=None,
                            rank=0, world_size=1, device=__import__("torch").device("cpu"))
    config = transformer_config(arch, groups, transformer_overrides={"init_method_std": 0.0123})
    assert config.init_method_std == 0.0123


@pytest.mark.parametrize("overrides, message", [
    ({"tensor_model_parallel_size": 2}, "use learner.tensor_parallel_size instead"),
    ({"hidden_size": 128}, r"the model's config.json"),
    ({"fp8": "e4m3"}, "learner.precision / fp8_format / fp8_recipe"),
    ({"cuda_graph_impl": {"a": 1}}, "must be a number, string, boolean or list"),
])
def test_transformer_overrides_are_checked_when_the_config_loads(overrides, message):
    with pytest.raises(ValueError, match=message):
        from_dict(LearnerConfig, {"transformer_overrides": overrides}, "learner")
    cfg = from_dict(LearnerConfig, apply_overrides({}, ["transformer_overrides.fp8_param=true"]), "learner")
    assert cfg.transformer_overrides == {"fp8_param": True}


def test_expandable_segments_are_refused_with_cuda_ipc_weight_sync():
    from megatron_s2lpo.config import load_config

    tensor = ["sync.transport=tensor", "rollout.learner.backend=sglang", "rollout.learner.model_path=/m"]
    with pytest.raises(ValueError, match="learner.expandable_segments=true with sync.transport=tensor"):
        load_config("examples/tiny_cpu.yaml", ["learner.expandable_segments=true", *tensor])
    assert load_config("examples/tiny_cpu.yaml", tensor).resolved_learner().expandable_segments is False  # auto
    recipe = load_config("examples/qwen3_8b_explorer_1p7b.yaml")
    assert recipe.learner.expandable_segments is None and recipe.resolved_learner().expandable_segments is True
    # the config keeps null, so a launcher that colocates (sync.transport=tensor) still gets it off
    colocated = load_config("examples/qwen3_8b_explorer_1p7b.yaml", ["sync.transport=tensor"])
    assert colocated.resolved_learner().expandable_segments is False


def test_every_gpu_recipe_overlaps_communication_and_saves_without_gathering():
    """The GPU recipes (examples/qwen3_*.yaml, the DAPO variant included): DP reduce and param
    gather overlapped, no recompute (selective core_attn saves nothing with TE's attention),
    asynchronous dp_reshardable checkpoints, expandable segments resolved on."""
    from pathlib import Path

    from megatron_s2lpo.config import load_config

    recipes = sorted(Path("examples").glob("qwen3_*.yaml"))
    assert len(recipes) >= 4
    for path in recipes:
        config = load_config(str(path))
        lc = config.learner
        assert lc.optim.use_distributed_optimizer and lc.overlap_grad_reduce and lc.overlap_param_gather, path
        # the MoE recipe's routed activations do not fit without it (test_moe_cp_config.py)
        assert lc.recompute_granularity == "none" or path.name == "qwen3_30b_a3b_explorer_4b.yaml", path
        assert lc.checkpoint.async_save and lc.checkpoint.optimizer_sharding == "dp_reshardable", path
        assert config.resolved_learner().expandable_segments is True, path
