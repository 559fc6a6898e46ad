"""Live megatron model chunks <-> the global names of `mapping.param_maps`.

A pipeline stage's `named_parameters()` numbers its layers from 0 within each model chunk; the
global layer of local layer i is `chunk.decoder.layers[i].layer_number - 1` (megatron adds the
stage / virtual-stage offset there), so uneven and interleaved layouts need no arithmetic here.
The same holds for the experts of a MoE layer: local expert j of an expert-parallel rank is
global expert `layer.mlp.local_expert_indices[j]`.

Needs torch only: chunks are used through their attributes, megatron is never imported.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from megatron_s2lpo.config.model import ModelArch

from . import mapping as M


def unwrap_model(chunk: Any) -> Any:
    """The GPTModel inside DDP / Float16Module wrappers (each keeps it as `.module`)."""
    model = chunk
    while not hasattr(model, "decoder") and hasattr(model, "module"):
        model = model.module
    if not hasattr(model, "decoder"):
        raise ValueError(f"{type(chunk).__name__} is not a megatron GPTModel (or a wrapper of one)")
    return model


def global_named_parameters(model_chunks: Sequence[Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """(global megatron name, parameter) for every parameter of this rank's chunks (global layer
    and expert numbers)."""
    for chunk in model_chunks:
        model = unwrap_model(chunk)
        layers = model.decoder.layers
        for name, param in model.named_parameters():
            local = M.layer_of(name)
            if local is not None:
                expert = M.expert_of(name)
                if expert is not None:
                    name = M.renumber_expert(name, layers[local].mlp.local_expert_indices[expert])
                name = M.renumber_layer(name, layers[local].layer_number - 1)
            yield name, param


def param_maps_of(arch: ModelArch, names: Sequence[str]) -> tuple[str, dict[str, M.ParamMap]]:
    """(naming variant, {global name: ParamMap}) for the layout these parameter names use."""
    naming = M.detect_naming(list(names))
    return naming, {pm.mcore_name: pm for pm in M.param_maps(arch, naming, M.detect_grouped(list(names)))}


def _is_tied_output_copy(arch: ModelArch, name: str) -> bool:
    # With tied embeddings and PP > 1 the last stage holds a copy of the word embeddings as
    # `output_layer.weight` (megatron keeps it equal to stage 0's); the embedding is the source.
    return arch.tie_word_embeddings and name == "output_layer.weight"


def owned_params(model_chunks: Sequence[Any], arch: ModelArch) -> tuple[str, dict[str, torch.Tensor]]:
    """(naming variant, {global name: parameter}) of this rank, tied output copy excluded.

    Raises ValueError for parameters that `param_maps(arch)` does not know (wrong arch / spec).
    """
    params = dict(global_named_parameters(model_chunks))
    naming, known = param_maps_of(arch, list(params))
    out = {}
    for name, param in params.items():
        if _is_tied_output_copy(arch, name):
            continue
        if name not in known:
            raise ValueError(f"megatron parameter {name!r} has no Hugging Face counterpart for the "
                             f"{arch.family} architecture {arch}; does the model match the config?")
        out[name] = param
    return naming, out


def load_hf_state(model_chunks: Sequence[Any], tp_rank: int, tp_size: int, arch: ModelArch,
                  hf_state: Mapping[str, torch.Tensor],
                  on_param: Callable[[int], Any] | None = None, *, etp_rank: int = 0, etp_size: int = 1) -> None:
    """Copy HF weights into this rank's live chunks (any TP/PP/VP/EP), in place.

    `hf_state` is a mapping of HF names to full tensors (a dict, or `hf_io.HFReader`), read
    lazily per parameter. Vocab rows are zero-padded to the model's padded size. Expert weights
    (this rank's experts only) are split over the expert tensor-parallel ranks (etp_rank of
    etp_size). on_param is called with the number of parameters loaded so far (progress bars).
    """
    params = dict(global_named_parameters(model_chunks))
    _, by_name = param_maps_of(arch, list(params))
    for done, (name, param) in enumerate(params.items(), 1):
        source = "embedding.word_embeddings.weight" if _is_tied_output_copy(arch, name) else name
        if source not in by_name:
            raise ValueError(f"megatron parameter {name!r} has no Hugging Face counterpart for {arch}")
        pm = by_name[source]
        padded = param.shape[0] * tp_size if pm.fuse == M.VOCAB else 0
        full = M.hf_to_mcore(pm, arch, [hf_state[n] for n in pm.hf_names], padded)
        rank, size = (etp_rank, etp_size) if pm.expert is not None else (tp_rank, tp_size)
        shard = M.shard_tp(pm, full, rank, size)
        M.check_shape(f"{name} (TP rank {rank})", shard, param.shape)
        with torch.no_grad():
            param.copy_(shard)
        if on_param is not None:
            on_param(done)
