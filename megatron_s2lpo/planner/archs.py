"""Model architectures the planner can size without reading the checkpoint.

A recipe names its models by path (`/models/Qwen3-8B-Base`), which a login node often cannot
read. The planner reads `config.json` when the path is readable and otherwise recognises the
published Qwen3 base models by name; the numbers below are those models' Hugging Face
`config.json` values.
"""

from __future__ import annotations

import os
import re

from megatron_s2lpo.config.model import ModelArch


def _qwen3(hidden: int, ffn: int, layers: int, heads: int, tie: bool) -> ModelArch:
    return ModelArch(family="qwen3", vocab_size=151936, hidden_size=hidden, ffn_hidden_size=ffn, num_layers=layers,
                     num_attention_heads=heads, num_query_groups=8, head_dim=128, rope_theta=1_000_000.0,
                     max_position_embeddings=32768, tie_word_embeddings=tie, qk_layernorm=True)


def _qwen3_moe(hidden: int, layers: int, heads: int, groups: int, experts: int, expert_ffn: int) -> ModelArch:
    return ModelArch(family="qwen3_moe", vocab_size=151936, hidden_size=hidden, ffn_hidden_size=6144,
                     num_layers=layers, num_attention_heads=heads, num_query_groups=groups, head_dim=128,
                     rope_theta=1_000_000.0, max_position_embeddings=40960, qk_layernorm=True,
                     num_experts=experts, num_experts_per_tok=8, moe_ffn_hidden_size=expert_ffn, norm_topk_prob=True)


KNOWN_ARCHS: dict[str, ModelArch] = {
    "qwen3-0.6b": _qwen3(1024, 3072, 28, 16, True),
    "qwen3-1.7b": _qwen3(2048, 6144, 28, 16, True),
    "qwen3-4b": _qwen3(2560, 9728, 36, 32, True),
    "qwen3-8b": _qwen3(4096, 12288, 36, 32, False),
    "qwen3-14b": _qwen3(5120, 17408, 40, 40, False),
    "qwen3-32b": _qwen3(5120, 25600, 64, 64, False),
    "qwen3-30b-a3b": _qwen3_moe(2048, 48, 32, 4, 128, 768),
    "qwen3-235b-a22b": _qwen3_moe(4096, 94, 64, 4, 128, 1536),
}


def known_arch(name: str) -> ModelArch | None:
    """The architecture of a published model named like `Qwen3-8B-Base` (any case, any suffix)."""
    match = re.match(r"(qwen3-\d+(?:\.\d+)?b(?:-a\d+b)?)", os.path.basename(name.rstrip("/")).lower())
    return KNOWN_ARCHS.get(match.group(1)) if match else None


def resolve_arch(model_path: str, init_arch: ModelArch | None, what: str) -> ModelArch:
    """`init_arch`, else `model_path`'s config.json when readable, else a known model by name."""
    if init_arch is not None:
        return init_arch
    if model_path and os.path.isfile(os.path.join(model_path, "config.json")):
        return ModelArch.from_hf_config(model_path)
    arch = known_arch(model_path) if model_path else None
    if arch is None:
        raise ValueError(f"{what}: cannot size the model at {model_path!r}: its config.json is not readable here "
                         f"and the name is not one of {sorted(KNOWN_ARCHS)}; run the planner where the model "
                         "directory is mounted")
    return arch
