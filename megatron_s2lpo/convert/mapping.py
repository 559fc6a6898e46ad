"""Pure maps between Hugging Face and megatron-core parameters (Qwen3, Qwen2.5, Llama 3, Qwen3-MoE).

One `ParamMap` per megatron parameter says which HF tensors it is made of, how they are fused,
and how the fused tensor is split over tensor-parallel (TP) ranks. The offline converter
(`tools/convert_checkpoint.py`) and the live exporter (`convert/export.py`, used by `sync/`) both
walk `param_maps(arch)` so the order, the names and the tensor math exist exactly once.

Conventions
- Megatron names use GLOBAL layer numbers (as in megatron's sharded state dict and dist
  checkpoints). `model.state_dict()` of a pipeline stage numbers its layers locally from 0: use
  `local_to_global_name` / `global_to_local_name` at that boundary.
- A "full" megatron tensor is the tensor of a TP=1 model, with the vocabulary padded to the
  model's padded vocab size; a "shard" is what one TP rank holds.
- Two megatron naming variants exist for the two layer norms inside a layer:
  "local" spec: `decoder.layers.N.input_layernorm.weight`, `decoder.layers.N.pre_mlp_layernorm.weight`;
  "te" spec:    `...self_attention.linear_qkv.layer_norm_weight`, `...mlp.linear_fc1.layer_norm_weight`.
  Dist checkpoints always use the "te" names (the local spec maps its keys on save).
- Mixture of experts (Qwen3-MoE): layer N's MLP is `decoder.layers.N.mlp.router.weight` and, per
  expert e, `mlp.experts.local_experts.{e}.linear_fc{1,2}.weight` (megatron's SequentialMLP) or
  `mlp.experts.linear_fc{1,2}.weight{e}` (TEGroupedMLP, grouped GEMM: `grouped=True`). Expert
  numbers in these names are GLOBAL, like layer numbers; a rank of expert-parallel rank r holds
  experts [r * E / EP, (r + 1) * E / EP) and numbers them locally from 0 in `state_dict()`. MoE
  layers keep a separate `pre_mlp_layernorm` under both specs (TE fuses it into linear_fc1 only
  for a dense MLP). Expert weights split over the EXPERT tensor-parallel ranks (ETP), every
  other weight over TP.

This module imports torch only (never megatron), so it is unit-tested in isolation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from megatron_s2lpo.config.model import ModelArch

NAMINGS = ("local", "te")

# fuse kinds: how HF tensors become one megatron tensor
COPY, QKV, GATE_UP, VOCAB = "copy", "qkv", "gate_up", "vocab"
# TP split kinds: how a full megatron tensor is split over TP ranks
REPLICATED, COLUMN, ROW = "replicated", "column", "row"  # plus GATE_UP (halves split separately)

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# HF tensors that carry no weights (old checkpoints saved the RoPE cache); ignored on import.
_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(kw_only=True, slots=True, frozen=True)
class ParamMap:
    """One megatron parameter and the HF tensors it is made of."""

    mcore_name: str  # global layer numbering
    hf_names: tuple[str, ...]  # in fused order (q, k, v) / (gate, up)
    fuse: str  # COPY | QKV | GATE_UP | VOCAB
    tp_split: str  # REPLICATED | COLUMN | ROW | GATE_UP
    layer: int | None = None  # global layer index; None outside the decoder layers
    expert: int | None = None  # global expert index of an expert weight; None otherwise


def check_supported(arch: ModelArch) -> None:
    """Raise ValueError for architectures megatron's GPTModel cannot represent exactly."""
    if arch.add_qkv_bias and arch.family != "qwen2":
        raise ValueError(
            f"attention_bias=true on a {arch.family} model also adds an o_proj bias, which "
            "megatron's add_qkv_bias does not model; only qwen2 checkpoints may carry QKV biases"
        )


def check_tp_size(arch: ModelArch, tp_size: int) -> None:
    """Raise ValueError when `arch` cannot be split over `tp_size` tensor-parallel ranks."""
    if tp_size < 1:
        raise ValueError(f"tensor parallel size must be >= 1, got {tp_size}")
    checks = {"num_attention_heads": arch.num_attention_heads}
    if not arch.is_moe:  # a MoE model's experts split over the expert tensor-parallel ranks instead
        checks["ffn_hidden_size"] = arch.ffn_hidden_size
    for field, value in checks.items():
        if value % tp_size:
            raise ValueError(f"model.{field} ({value}) is not divisible by tensor parallel size "
                             f"{tp_size}; choose a TP size that divides it")
    ng = arch.num_query_groups
    if ng % tp_size and tp_size % ng:
        raise ValueError(f"model.num_query_groups ({ng}) and tensor parallel size {tp_size} must "
                         "divide one another")


def check_expert_parallel(arch: ModelArch, ep_size: int, etp_size: int = 1) -> None:
    """Raise ValueError when the experts cannot be spread over `ep_size` expert-parallel ranks and
    split over `etp_size` expert tensor-parallel ranks."""
    if ep_size < 1 or etp_size < 1:
        raise ValueError(f"expert parallel sizes must be >= 1, got EP={ep_size}, ETP={etp_size}")
    if not arch.is_moe:
        if ep_size > 1 or etp_size > 1:
            raise ValueError(f"expert parallelism (EP={ep_size}, ETP={etp_size}) needs a mixture-of-experts "
                             f"model; {arch.family} is dense")
        return
    if arch.num_experts % ep_size:
        raise ValueError(f"model.num_experts ({arch.num_experts}) is not divisible by expert parallel size "
                         f"{ep_size}; choose an EP size that divides it")
    if arch.moe_ffn_hidden_size % etp_size:
        raise ValueError(f"model.moe_ffn_hidden_size ({arch.moe_ffn_hidden_size}) is not divisible by expert "
                         f"tensor parallel size {etp_size}")


def expert_owner(expert: int, num_experts: int, ep_size: int) -> tuple[int, int]:
    """(expert-parallel rank, local index) of global expert `expert` (megatron's contiguous split)."""
    per_rank = num_experts // ep_size
    return expert // per_rank, expert % per_rank


def check_pp_size(arch: ModelArch, pp_size: int) -> None:
    """Raise ValueError when the layers cannot be spread evenly over `pp_size` stages."""
    if pp_size < 1 or arch.num_layers % pp_size:
        raise ValueError(f"model.num_layers ({arch.num_layers}) must be divisible by pipeline "
                         f"parallel size {pp_size}")


# ---------------------------------------------------------------------------------------------
# names


def layer_param_maps(arch: ModelArch, layer: int, naming: str = "local", grouped: bool = False) -> list[ParamMap]:
    """The megatron parameters of decoder layer `layer` (global index) in a fixed order.

    grouped: MoE expert weights under TEGroupedMLP's names (grouped GEMM) instead of SequentialMLP's."""
    if naming not in NAMINGS:
        raise ValueError(f"megatron naming {naming!r} is not one of {NAMINGS}")
    m, h = f"decoder.layers.{layer}.", f"model.layers.{layer}."
    if naming == "local":
        in_norm, mlp_norm = m + "input_layernorm.weight", m + "pre_mlp_layernorm.weight"
    else:
        in_norm = m + "self_attention.linear_qkv.layer_norm_weight"
        mlp_norm = m + "mlp.linear_fc1.layer_norm_weight"
    attn = h + "self_attn."
    if arch.is_moe:  # MoE layers keep the pre-MLP norm separate under both specs
        mlp_norm = m + "pre_mlp_layernorm.weight"
    maps = [
        ParamMap(mcore_name=in_norm, hf_names=(h + "input_layernorm.weight",),
                 fuse=COPY, tp_split=REPLICATED, layer=layer),
        ParamMap(mcore_name=m + "self_attention.linear_qkv.weight",
                 hf_names=(attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"),
                 fuse=QKV, tp_split=COLUMN, layer=layer),
    ]
    if arch.add_qkv_bias:
        maps.append(ParamMap(
            mcore_name=m + "self_attention.linear_qkv.bias",
            hf_names=(attn + "q_proj.bias", attn + "k_proj.bias", attn + "v_proj.bias"),
            fuse=QKV, tp_split=COLUMN, layer=layer))
    if arch.qk_layernorm:
        maps += [
            ParamMap(mcore_name=m + "self_attention.q_layernorm.weight",
                     hf_names=(attn + "q_norm.weight",), fuse=COPY, tp_split=REPLICATED, layer=layer),
            ParamMap(mcore_name=m + "self_attention.k_layernorm.weight",
                     hf_names=(attn + "k_norm.weight",), fuse=COPY, tp_split=REPLICATED, layer=layer),
        ]
    maps += [
        ParamMap(mcore_name=m + "self_attention.linear_proj.weight", hf_names=(attn + "o_proj.weight",),
                 fuse=COPY, tp_split=ROW, layer=layer),
        ParamMap(mcore_name=mlp_norm, hf_names=(h + "post_attention_layernorm.weight",),
                 fuse=COPY, tp_split=REPLICATED, layer=layer),
    ]
    return maps + (_expert_maps(arch, layer, grouped) if arch.is_moe else _dense_mlp_maps(layer))


def expert_name(layer: int, expert: int, fc: int, grouped: bool = False) -> str:
    """The megatron name of expert `expert`'s linear_fc{fc} weight in layer `layer` (global numbers)."""
    if grouped:
        return f"decoder.layers.{layer}.mlp.experts.linear_fc{fc}.weight{expert}"
    return f"decoder.layers.{layer}.mlp.experts.local_experts.{expert}.linear_fc{fc}.weight"


def _expert_maps(arch: ModelArch, layer: int, grouped: bool) -> list[ParamMap]:
    """Router, then per expert [gate; up] (fc1) and down (fc2), split over expert-TP ranks."""
    m, h = f"decoder.layers.{layer}.mlp.", f"model.layers.{layer}.mlp."
    maps = [ParamMap(mcore_name=m + "router.weight", hf_names=(h + "gate.weight",), fuse=COPY,
                     tp_split=REPLICATED, layer=layer)]
    for e in range(arch.num_experts):
        hf = f"{h}experts.{e}."
        maps += [
            ParamMap(mcore_name=expert_name(layer, e, 1, grouped), hf_names=(hf + "gate_proj.weight", hf + "up_proj.weight"),
                     fuse=GATE_UP, tp_split=GATE_UP, layer=layer, expert=e),
            ParamMap(mcore_name=expert_name(layer, e, 2, grouped), hf_names=(hf + "down_proj.weight",),
                     fuse=COPY, tp_split=ROW, layer=layer, expert=e),
        ]
    return maps


def _dense_mlp_maps(layer: int) -> list[ParamMap]:
    m, h = f"decoder.layers.{layer}.", f"model.layers.{layer}."
    return [
        ParamMap(mcore_name=m + "mlp.linear_fc1.weight",
                 hf_names=(h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"),
                 fuse=GATE_UP, tp_split=GATE_UP, layer=layer),
        ParamMap(mcore_name=m + "mlp.linear_fc2.weight", hf_names=(h + "mlp.down_proj.weight",),
                 fuse=COPY, tp_split=ROW, layer=layer),
    ]


def param_maps(arch: ModelArch, naming: str = "local", grouped: bool = False) -> list[ParamMap]:
    """Every megatron parameter of `arch` in the one global order used by import and export.

    Order: embedding, layers 0..L-1 (MoE: router, then experts 0..E-1), final norm, output layer
    (absent when embeddings are tied).
    """
    check_supported(arch)
    maps = [ParamMap(mcore_name="embedding.word_embeddings.weight", hf_names=("model.embed_tokens.weight",),
                     fuse=VOCAB, tp_split=COLUMN)]
    for layer in range(arch.num_layers):
        maps += layer_param_maps(arch, layer, naming, grouped)
    maps.append(ParamMap(mcore_name="decoder.final_layernorm.weight", hf_names=("model.norm.weight",),
                         fuse=COPY, tp_split=REPLICATED))
    if not arch.tie_word_embeddings:
        maps.append(ParamMap(mcore_name="output_layer.weight", hf_names=("lm_head.weight",),
                             fuse=VOCAB, tp_split=COLUMN))
    return maps


def hf_names(arch: ModelArch) -> list[str]:
    """The HF tensor names of `arch` in export order (`lm_head.weight` only when untied)."""
    return [name for pm in param_maps(arch) for name in pm.hf_names]


def convert_naming(name: str, naming: str) -> str:
    """Rename a layer-norm parameter between the "local" and "te" variants (others unchanged)."""
    pairs = [("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"),
             ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight")]
    for local, te in pairs:
        src, dst = (te, local) if naming == "local" else (local, te)
        if name.endswith("." + src) and name.startswith("decoder.layers."):
            return name[: -len(src)] + dst
    return name


def detect_naming(names: Sequence[str]) -> str:
    """"te" if any name uses the Transformer Engine fused layer-norm names (or, in a MoE model, TE
    grouped experts), else "local"."""
    return "te" if any(n.endswith(".layer_norm_weight") or _GROUPED_RE.match(n) for n in names) else "local"


_GROUPED_RE = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts\.linear_fc[12]\.weight)(\d+)$")
_SEQUENTIAL_RE = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts\.local_experts\.)(\d+)(\..+)$")


def detect_grouped(names: Sequence[str]) -> bool:
    """Whether the expert weights use TEGroupedMLP's names (`experts.linear_fc1.weight<e>`)."""
    return any(_GROUPED_RE.match(n) for n in names)


def expert_of(name: str) -> int | None:
    """The expert number in an expert weight's name (either layout), else None."""
    match = _GROUPED_RE.match(name) or _SEQUENTIAL_RE.match(name)
    return int(match.group(2)) if match else None


def renumber_expert(name: str, expert: int) -> str:
    """An expert weight's name with expert number `expert` (other names unchanged)."""
    if match := _GROUPED_RE.match(name):
        return f"{match.group(1)}{expert}"
    if match := _SEQUENTIAL_RE.match(name):
        return f"{match.group(1)}{expert}{match.group(3)}"
    return name


def layer_of(name: str) -> int | None:
    """The layer number in a `decoder.layers.N.` name, else None."""
    match = _LAYER_RE.match(name)
    return int(match.group(1)) if match else None


def renumber_layer(name: str, layer: int) -> str:
    """`decoder.layers.N.rest` -> `decoder.layers.{layer}.rest` (other names unchanged)."""
    match = _LAYER_RE.match(name)
    return f"decoder.layers.{layer}.{match.group(2)}" if match else name


def local_to_global_name(name: str, layer_offset: int) -> str:
    """A pipeline stage's `state_dict()` name -> the global name (layer + stage offset)."""
    layer = layer_of(name)
    return name if layer is None else renumber_layer(name, layer + layer_offset)


def global_to_local_name(name: str, layer_offset: int) -> str:
    layer = layer_of(name)
    return name if layer is None else renumber_layer(name, layer - layer_offset)


# ---------------------------------------------------------------------------------------------
# shapes


def hf_shapes(pm: ParamMap, arch: ModelArch) -> list[tuple[int, ...]]:
    """Shapes of the HF tensors of `pm`, in `pm.hf_names` order."""
    h, hd = arch.hidden_size, arch.head_dim
    q_dim, kv_dim = arch.num_attention_heads * hd, arch.num_query_groups * hd
    suffix = pm.mcore_name.rsplit(".", 2)[-2:]
    if pm.expert is not None:  # gate/up (moe_ffn, h) each, or down (h, moe_ffn)
        f = arch.moe_ffn_hidden_size
        return [(f, h)] * 2 if pm.fuse == GATE_UP else [(h, f)]
    if suffix[0] == "router":
        return [(arch.num_experts, h)]
    if pm.fuse == VOCAB:
        return [(arch.vocab_size, h)]
    if pm.fuse == QKV:
        rows = [(q_dim,), (kv_dim,), (kv_dim,)]
        return [r + (h,) for r in rows] if suffix[-1] == "weight" else rows
    if pm.fuse == GATE_UP:
        return [(arch.ffn_hidden_size, h)] * 2
    if suffix[0] in ("q_layernorm", "k_layernorm"):
        return [(hd,)]
    if suffix[0] == "linear_proj":
        return [(h, q_dim)]
    if suffix[0] == "linear_fc2":
        return [(h, arch.ffn_hidden_size)]
    return [(h,)]  # norms


def mcore_shape(pm: ParamMap, arch: ModelArch, padded_vocab_size: int) -> tuple[int, ...]:
    """Shape of the full (TP=1) megatron tensor of `pm`."""
    shapes = hf_shapes(pm, arch)
    if pm.fuse == VOCAB:
        return (padded_vocab_size, arch.hidden_size)
    if pm.fuse in (QKV, GATE_UP):
        return (sum(s[0] for s in shapes),) + shapes[0][1:]
    return shapes[0]


def check_shape(name: str, tensor: torch.Tensor, expected: Sequence[int]) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(expected)}")


# ---------------------------------------------------------------------------------------------
# tensors: HF <-> full megatron


def hf_to_mcore(pm: ParamMap, arch: ModelArch, tensors: Sequence[torch.Tensor],
                padded_vocab_size: int) -> torch.Tensor:
    """Fuse the HF tensors of `pm` (in `pm.hf_names` order) into the full megatron tensor."""
    assert len(tensors) == len(pm.hf_names), pm
    for name, tensor, shape in zip(pm.hf_names, tensors, hf_shapes(pm, arch)):
        check_shape(name, tensor, shape)
    if pm.fuse == COPY:
        return tensors[0]
    if pm.fuse == VOCAB:  # (V, H) -> (Vp, H), zero rows past the tokenizer's vocabulary
        if padded_vocab_size < arch.vocab_size:
            raise ValueError(f"padded vocab size {padded_vocab_size} < vocab_size {arch.vocab_size}")
        pad = tensors[0].new_zeros((padded_vocab_size - arch.vocab_size, arch.hidden_size))
        return torch.cat([tensors[0], pad]) if len(pad) else tensors[0]
    if pm.fuse == GATE_UP:  # (F, H) x2 -> (2F, H): [gate; up]
        return torch.cat(tensors)
    # QKV: rows grouped per query group g: [q heads of g; k of g; v of g], as megatron's
    # SelfAttention.get_query_key_value_tensors views them ([ng, (np/ng + 2) * hn]).
    q, k, v = tensors
    ng, hd = arch.num_query_groups, arch.head_dim
    rest = q.shape[1:]  # (H,) for weights, () for biases
    q = q.reshape(ng, -1, *rest)  # (ng, np/ng * hd, ...)
    k, v = k.reshape(ng, hd, *rest), v.reshape(ng, hd, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)  # (ng * (np/ng + 2) * hd, ...)


def mcore_to_hf_views(pm: ParamMap, arch: ModelArch, full: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Views of the full megatron tensor of `pm`, one per HF tensor, with no copy.

    Each view has the HF tensor's elements in row-major order, but QKV views keep the grouped
    shape (num_query_groups, rows_per_group, ...): `view.reshape(hf_shape)` is the HF tensor,
    and `contiguous_dst.view(view.shape).copy_(view)` writes it with a single copy.
    """
    if pm.fuse == VOCAB:
        if full.dim() != 2 or full.shape[0] < arch.vocab_size or full.shape[1] != arch.hidden_size:
            raise ValueError(f"tensor {pm.mcore_name!r} has shape {tuple(full.shape)}, expected "
                             f"(>= {arch.vocab_size}, {arch.hidden_size})")
        return [(pm.hf_names[0], full[: arch.vocab_size])]
    check_shape(pm.mcore_name, full, mcore_shape(pm, arch, 0))
    if pm.fuse == COPY:
        return [(pm.hf_names[0], full)]
    if pm.fuse == GATE_UP:
        return list(zip(pm.hf_names, full.chunk(2, dim=0)))
    ng, hd = arch.num_query_groups, arch.head_dim
    q_rows = arch.num_attention_heads // ng * hd
    grouped = full.reshape(ng, q_rows + 2 * hd, *full.shape[1:])  # a view: full is contiguous
    return list(zip(pm.hf_names, grouped.split([q_rows, hd, hd], dim=1)))


def mcore_to_hf(pm: ParamMap, arch: ModelArch, full: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Split the full megatron tensor of `pm` into its HF tensors (vocab padding dropped).

    Returned tensors may be views of `full` (or copies where the QKV layout needs one); callers
    that keep them past `full` should clone.
    """
    return [(name, view.reshape(shape)) for (name, view), shape
            in zip(mcore_to_hf_views(pm, arch, full.contiguous()), hf_shapes(pm, arch))]


# ---------------------------------------------------------------------------------------------
# tensors: full megatron <-> TP shards


def _split_dim(pm: ParamMap) -> int | None:
    return {REPLICATED: None, COLUMN: 0, GATE_UP: 0, ROW: 1}[pm.tp_split]


def split_tp(pm: ParamMap, full: torch.Tensor, tp_size: int) -> list[torch.Tensor]:
    """The `tp_size` shards of a full megatron tensor (views; replicated ones repeat `full`).

    Column-parallel tensors (qkv, vocab rows) split contiguously along rows: with num_query_groups
    >= tp each rank gets whole query groups, with fewer groups megatron gathers the rows back in
    the forward pass, so contiguous chunks are right in both cases. linear_fc1 = [gate; up] splits
    gate and up separately so every rank holds [gate_r; up_r].
    """
    dim = _split_dim(pm)
    if dim is None:
        return [full] * tp_size
    if full.shape[dim] % (2 * tp_size if pm.tp_split == GATE_UP else tp_size):
        raise ValueError(f"tensor {pm.mcore_name!r} dim {dim} of size {full.shape[dim]} cannot be "
                         f"split over {tp_size} tensor-parallel ranks")
    if pm.tp_split == GATE_UP:
        gate, up = full.chunk(2, dim=0)
        return [torch.cat([g, u]) for g, u in zip(gate.chunk(tp_size), up.chunk(tp_size))]
    return list(full.chunk(tp_size, dim=dim))


def shard_tp(pm: ParamMap, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    return split_tp(pm, full, tp_size)[tp_rank]


def merge_tp(pm: ParamMap, shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inverse of `split_tp`: the full megatron tensor from all TP ranks' shards (rank order)."""
    dim = _split_dim(pm)
    if dim is None:
        return shards[0]
    if pm.tp_split == GATE_UP:
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    return torch.cat(list(shards), dim=dim)


# ---------------------------------------------------------------------------------------------
# whole state dicts (tests, small models, the offline tool)


def check_hf_names(arch: ModelArch, names: Sequence[str]) -> None:
    """Raise ValueError listing missing and unexpected HF tensors of a checkpoint of `arch`."""
    expected = set(hf_names(arch))
    present = {n for n in names if not n.endswith(_IGNORED_HF_SUFFIXES)}
    if arch.tie_word_embeddings:
        present.discard("lm_head.weight")  # some exporters write the tied copy
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing or unexpected:
        raise ValueError(
            f"HF checkpoint does not match the {arch.family} architecture of its config: "
            f"missing tensors {few_names(missing)}, unexpected tensors {few_names(unexpected)}"
        )


def check_hf_shapes(arch: ModelArch, shapes: Mapping[str, Sequence[int]]) -> None:
    """`check_hf_names`, then every tensor's shape (from checkpoint metadata, nothing loaded)."""
    check_hf_names(arch, list(shapes))
    for pm in param_maps(arch):
        for name, expected in zip(pm.hf_names, hf_shapes(pm, arch)):
            if tuple(shapes[name]) != expected:
                raise ValueError(f"tensor {name!r} has shape {tuple(shapes[name])}, expected {expected} "
                                 f"for the architecture in config.json")


def few_names(names: list[str], limit: int = 8) -> str:
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return f"{names[:limit]}{more}" if names else "none"


def hf_to_mcore_state(arch: ModelArch, hf_state: Mapping[str, torch.Tensor], *, tp_size: int = 1,
                      tp_rank: int = 0, padded_vocab_size: int | None = None, naming: str = "local",
                      ep_size: int = 1, ep_rank: int = 0, etp_size: int = 1, etp_rank: int = 0,
                      grouped: bool = False) -> dict[str, torch.Tensor]:
    """Full HF state dict -> this rank's megatron tensors, global names, all layers.

    A MoE rank holds the experts of its expert-parallel rank `ep_rank`, each split over `etp_size`
    expert tensor-parallel ranks (shard `etp_rank`); everything else is split over TP.
    `padded_vocab_size` defaults to `arch.padded_vocab_size(tp_size)`. Shards are cloned so the
    result owns its memory.
    """
    check_hf_names(arch, list(hf_state))
    check_tp_size(arch, tp_size)
    check_expert_parallel(arch, ep_size, etp_size)
    vocab = padded_vocab_size or arch.padded_vocab_size(tp_size)
    out = {}
    for pm in param_maps(arch, naming, grouped):
        if pm.expert is not None and expert_owner(pm.expert, arch.num_experts, ep_size)[0] != ep_rank:
            continue
        full = hf_to_mcore(pm, arch, [hf_state[n] for n in pm.hf_names], vocab)
        rank, size = (etp_rank, etp_size) if pm.expert is not None else (tp_rank, tp_size)
        out[pm.mcore_name] = shard_tp(pm, full, rank, size).clone()
    return out


def mcore_to_hf_state(arch: ModelArch, rank_states: Sequence[Mapping[str, torch.Tensor]],
                      naming: str | None = None, *, tp_size: int | None = None, ep_size: int = 1,
                      etp_size: int = 1) -> dict[str, torch.Tensor]:
    """All ranks' megatron state dicts (global names, global rank order) -> the HF state dict.

    Ranks are laid out as megatron lays them out for one pipeline stage: rank r is TP rank
    r % tp_size for dense weights, and expert-TP rank r % etp_size of expert-parallel rank
    (r // etp_size) % ep_size for expert weights; further ranks are data-parallel copies.
    tp_size None: every state is one TP rank (len(rank_states)), the dense-model case.
    """
    tp_size = tp_size or len(rank_states)
    names = list(rank_states[0])
    naming = naming or detect_naming(names)
    out = {}
    for pm in param_maps(arch, naming, detect_grouped(names)):
        if pm.expert is None:
            ranks = list(range(tp_size))
        else:
            owner = expert_owner(pm.expert, arch.num_experts, ep_size)[0]
            ranks = [owner * etp_size + t for t in range(etp_size)]
        missing = [r for r in ranks if r >= len(rank_states) or pm.mcore_name not in rank_states[r]]
        if missing:
            kind = "TP" if pm.expert is None else "expert-parallel"
            raise ValueError(f"megatron tensor {pm.mcore_name!r} is missing on {kind} ranks {missing}")
        full = merge_tp(pm, [rank_states[r][pm.mcore_name] for r in ranks])
        out.update((n, t.clone()) for n, t in mcore_to_hf(pm, arch, full))
    return out
