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
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
FAMILIES = tuple(sorted(set(HF_ARCHITECTURES.values())))
_FAMILY_TO_HF = {family: arch for arch, family in HF_ARCHITECTURES.items()}
_FAMILY_TO_MODEL_TYPE = {"qwen3": "qwen3", "qwen2": "qwen2", "llama": "llama", "qwen3_moe": "qwen3_moe"}
MOE_FAMILIES = ("qwen3_moe",)


@dataclass(kw_only=True, slots=True, frozen=True)
class ModelArch:
    """Architecture of a Qwen3 / Qwen2.5 / Llama 3 / Qwen3-MoE decoder (RMSNorm, SwiGLU, RoPE, GQA).

    Mixture of experts (qwen3_moe): every layer's MLP is `num_experts` SwiGLU experts of width
    `moe_ffn_hidden_size` behind a linear router (no bias) whose softmax picks the top
    `num_experts_per_tok`; `norm_topk_prob` renormalises the chosen probabilities to sum to 1.
    `ffn_hidden_size` (HF `intermediate_size`) is then unused by the layers.
    """

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
    num_experts: int = 0  # routed experts per layer (0: dense MLP)
    num_experts_per_tok: int = 0  # router top-k
    moe_ffn_hidden_size: int = 0  # one expert's SwiGLU width (HF moe_intermediate_size)
    norm_topk_prob: bool = False  # renormalise the top-k router probabilities

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"model family {self.family!r} is not supported; choose one of {FAMILIES}")
        self._check_experts()
        for name in ("vocab_size", "hidden_size", "ffn_hidden_size", "num_layers",
                     "num_attention_heads", "num_query_groups", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"model.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"model.num_query_groups ({self.num_query_groups}) for grouped-query attention"
            )

    def _check_experts(self) -> None:
        if self.family not in MOE_FAMILIES:
            if self.num_experts:
                raise ValueError(f"model.num_experts={self.num_experts} on a dense {self.family} model; "
                                 f"mixture-of-experts models are the families {MOE_FAMILIES}")
            return
        if self.num_experts < 1 or self.moe_ffn_hidden_size < 1:
            raise ValueError(f"a {self.family} model needs model.num_experts >= 1 and model.moe_ffn_hidden_size >= 1, "
                             f"got {self.num_experts} and {self.moe_ffn_hidden_size}")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"model.num_experts_per_tok must be in [1, num_experts={self.num_experts}], "
                             f"got {self.num_experts_per_tok}")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

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
        per_layer = attn + self.mlp_params() + 2 * self.hidden_size
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return self.num_layers * per_layer + embed + head + self.hidden_size

    def mlp_params(self, *, active: bool = False) -> int:
        """Parameters of one layer's MLP: all experts and the router, or with `active` only the
        top-k experts a token passes through (what its FLOPs scale with)."""
        if not self.is_moe:
            return 3 * self.hidden_size * self.ffn_hidden_size
        experts = self.num_experts_per_tok if active else self.num_experts
        return experts * 3 * self.hidden_size * self.moe_ffn_hidden_size + self.num_experts * self.hidden_size

    def num_active_params(self) -> int:
        """Parameters one token passes through (= num_params for dense models)."""
        return self.num_params() - self.num_layers * (self.mlp_params() - self.mlp_params(active=True))

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
        if self.family in ("qwen3", "qwen3_moe"):
            cfg.update(attention_bias=False)
        if self.is_moe:
            cfg.update(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                       moe_intermediate_size=self.moe_ffn_hidden_size, norm_topk_prob=self.norm_topk_prob,
                       decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.0,
                       output_router_logits=False)
        if self.rope_scaling is not None:
            cfg["rope_scaling"] = {"rope_type": "llama3", **self.rope_scaling}
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)


def _arch_from_dict(cfg: dict, source: str) -> ModelArch:
    archs = cfg.get("architectures") or []
    family = next((HF_ARCHITECTURES[a] for a in archs if a in HF_ARCHITECTURES), None)
    if family is None:
        family = {"qwen3": "qwen3", "qwen2": "qwen2", "llama": "llama",
                  "qwen3_moe": "qwen3_moe"}.get(cfg.get("model_type", ""))
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
        **_experts_from_dict(cfg, family, source),
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
        qk_layernorm=family in ("qwen3", "qwen3_moe"),
        add_qkv_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
        rope_scaling=rope_scaling,
    )


def _experts_from_dict(cfg: dict, family: str, source: str) -> dict:
    """The ModelArch expert fields of a Qwen3-MoE config (empty for dense families)."""
    if family not in MOE_FAMILIES:
        return {}
    if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
        # SGLang 0.5.23's Qwen3-MoE builds every layer as MoE and silently drops dense MLP
        # weights (models/qwen3_moe.py reads neither field), so such a learner could not be served.
        raise ValueError(f"{source}: dense layers in a Qwen3-MoE model (mlp_only_layers="
                         f"{cfg.get('mlp_only_layers')}, decoder_sparse_step={cfg.get('decoder_sparse_step')}) are "
                         "not supported: SGLang 0.5.23 serves every layer as MoE; use a model whose layers are all "
                         "sparse (as Qwen3-30B-A3B and Qwen3-235B-A22B are)")
    if cfg.get("shared_expert_intermediate_size"):
        raise ValueError(f"{source}: shared experts are not part of Qwen3-MoE; this config looks like Qwen2-MoE, "
                         "which is not supported")
    num_experts = cfg.get("num_experts", cfg.get("num_local_experts"))  # transformers 5 writes the latter
    missing = [k for k, v in (("num_experts", num_experts), ("num_experts_per_tok", cfg.get("num_experts_per_tok")),
                              ("moe_intermediate_size", cfg.get("moe_intermediate_size"))) if v is None]
    if missing:
        raise ValueError(f"{source}: missing required field(s) {missing} for a qwen3_moe model")
    return {"num_experts": int(num_experts), "num_experts_per_tok": int(cfg["num_experts_per_tok"]),
            "moe_ffn_hidden_size": int(cfg["moe_intermediate_size"]),
            "norm_topk_prob": bool(cfg.get("norm_topk_prob", False))}
