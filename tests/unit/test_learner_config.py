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
