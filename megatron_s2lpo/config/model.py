"""Model architecture, read from a Hugging Face `config.json` so users never retype it.

`ModelArch` is the one description of a decoder-only model that the learner (building a
megatron-core GPTModel), the converter (mapping names and tensors) and the rollout engines
(building a transformers model of the same architecture) all share.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Any

# Hugging Face `architectures[0]` -> our family name.
HF_ARCHITECTURES = {
    "Qwen3ForCausalLM": "qwen3",
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
}
FAMILIES = tuple(sorted(set(HF_ARCHITECTURES.values())))
_FAMILY_TO_HF = {family: arch for arch, family in HF_ARCHITECTURES.items()}
_FAMILY_TO_MODEL_TYPE = {"qwen3": "qwen3", "qwen2": "qwen2", "llama": "llama"}


@dataclass(kw_only=True, slots=True, frozen=True)
class ModelArch:
    """Architecture of a Qwen3 / Qwen2.5 / Llama 3 decoder (RMSNorm, SwiGLU, RoPE, GQA)."""

    family: str  # one of FAMILIES
    vocab_size: int  # the tokenizer-facing vocabulary (HF `vocab_size`), before TP padding
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int  # HF `num_key_value_heads`
    head_dim: int  # megatron `kv_channels`
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    qk_layernorm: bool = False  # Qwen3
    add_qkv_bias: bool = False  # Qwen2 / Qwen2.5
    # Llama 3.1 style frequency scaling: {"factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}; None for plain RoPE.
    rope_scaling: dict | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"model family {self.family!r} is not supported; choose one of {FAMILIES}")
        for name in ("vocab_size", "hidden_size", "ffn_hidden_size", "num_layers",
                     "num_attention_heads", "num_query_groups", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"model.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"model.num_query_groups ({self.num_query_groups}) for grouped-query attention"
            )

    @property
    def hf_architecture(self) -> str:
        return _FAMILY_TO_HF[self.family]

    def padded_vocab_size(self, tensor_parallel_size: int = 1, divisible_by: int = 128) -> int:
        """Vocab rows in the Megatron embedding/output layer (Megatron's padding rule).

        Rows past `vocab_size` are zero in converted checkpoints and their logits are masked
        out before any softmax, so padding never changes a probability.
        """
        multiple = divisible_by * tensor_parallel_size
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def num_params(self) -> int:
        """Parameter count of the unpadded HF model (for FLOP estimates and benchmarks)."""
        q_dim = self.num_attention_heads * self.head_dim
        kv_dim = self.num_query_groups * self.head_dim
        attn = self.hidden_size * (q_dim + 2 * kv_dim) + q_dim * self.hidden_size
        if self.add_qkv_bias:
            attn += q_dim + 2 * kv_dim
        if self.qk_layernorm:
            attn += 2 * self.head_dim
        mlp = 3 * self.hidden_size * self.ffn_hidden_size
        per_layer = attn + mlp + 2 * self.hidden_size
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return self.num_layers * per_layer + embed + head + self.hidden_size

    @classmethod
    def from_hf_config(cls, config: Any) -> "ModelArch":
        """Read a HF config: a `PretrainedConfig`, a dict, a `config.json` path or its directory."""
        source = "config"
        if isinstance(config, (str, os.PathLike)):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no Hugging Face config at {path}: pass a model directory "
                                        "containing config.json, or the config.json file")
            with open(path) as f:
                config = json.load(f)
            source = path
        elif not isinstance(config, dict):
            config = config.to_dict()
        return _arch_from_dict(config, source)

    def to_hf_config_dict(self) -> dict:
        """The `config.json` of the HF model with this architecture (fp32 weights)."""
        cfg = {
            "architectures": [self.hf_architecture],
            "model_type": _FAMILY_TO_MODEL_TYPE[self.family],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.ffn_hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_query_groups,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "torch_dtype": "float32",
        }
        if self.family == "llama":
            cfg.update(attention_bias=False, mlp_bias=False)
        if self.family == "qwen3":
            cfg.update(attention_bias=False)
        if self.rope_scaling is not None:
            cfg["rope_scaling"] = {"rope_type": "llama3", **self.rope_scaling}
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)


def _arch_from_dict(cfg: dict, source: str) -> ModelArch:
    archs = cfg.get("architectures") or []
    family = next((HF_ARCHITECTURES[a] for a in archs if a in HF_ARCHITECTURES), None)
    if family is None:
        family = {"qwen3": "qwen3", "qwen2": "qwen2", "llama": "llama"}.get(cfg.get("model_type", ""))
    if family is None:
        raise ValueError(
            f"{source}: architecture {archs or cfg.get('model_type')!r} is not supported; "
            f"supported: {sorted(HF_ARCHITECTURES)}"
        )

    def need(key: str) -> Any:
        if key not in cfg:
            raise ValueError(f"{source}: missing required field {key!r} for a {family} model")
        return cfg[key]

    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
    if cfg.get("use_sliding_window", False):
        raise ValueError(f"{source}: sliding-window attention is not supported; set use_sliding_window false")
    if cfg.get("mlp_bias", False):
        raise ValueError(f"{source}: mlp_bias=true is not supported")
    num_heads = need("num_attention_heads")
    hidden = need("hidden_size")
    rope_scaling = cfg.get("rope_scaling")
    if not rope_scaling and isinstance(cfg.get("rope_parameters"), dict):
        rope_scaling = cfg["rope_parameters"]  # transformers 5 keeps the scaling (and theta) here
    if rope_scaling:
        rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
        if rope_type == "default":
            rope_scaling = None
        elif rope_type != "llama3":
            raise ValueError(f"{source}: rope_scaling type {rope_type!r} is not supported (only llama3)")
        else:
            rope_scaling = {k: rope_scaling[k] for k in
                            ("factor", "low_freq_factor", "high_freq_factor",
                             "original_max_position_embeddings")}
    rope_theta = cfg.get("rope_theta")
    if rope_theta is None:  # transformers 5 nests it under rope_parameters
        rope_theta = (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return ModelArch(
        family=family,
        vocab_size=need("vocab_size"),
        hidden_size=hidden,
        ffn_hidden_size=need("intermediate_size"),
        num_layers=need("num_hidden_layers"),
        num_attention_heads=num_heads,
        num_query_groups=cfg.get("num_key_value_heads") or num_heads,
        head_dim=cfg.get("head_dim") or hidden // num_heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        max_position_embeddings=cfg.get("max_position_embeddings", 32768),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qk_layernorm=family == "qwen3",
        add_qkv_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
        rope_scaling=rope_scaling,
    )
