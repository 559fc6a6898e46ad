"""megatron-core dist checkpoints (torch_dist) <-> Hugging Face directories.

Both directions build this rank's model chunks with the learner's own builder
(`learner.model.build_model_chunks`) under whatever layout `groups` describes (a single process
at TP=1/PP=1 is the usual case; under torchrun every rank builds and handles its own shard), so
the checkpoint keys are exactly those the learner asks for when it loads:

- HF -> megatron: copy HF weights into the chunks (`live.load_hf_state`), then save them with
  the learner's `checkpoint.save_checkpoint` as a weights-only checkpoint at step 0:

      out_dir/
        latest                  "step_00000000"
        step_00000000/
          dist/                 dist_checkpointing torch_dist: {"model": chunk.sharded_state_dict()}
                                ("model0", "model1", ... per virtual pipeline stage)
          trainer_state.json    {"step": 0, ...}
          COMPLETE
        convert_info.json       source, architecture, dtype, target TP/PP
- megatron -> HF: check the checkpoint's tensors against the chunks' sharded state dict (missing,
  unexpected, wrong shapes), `dist_checkpointing.load` into the chunks, then stream them out with
  `export.iter_flat_buckets` and write safetensors shards on global rank 0.

Checkpoint keys use global layer numbers (layers are stacked along a leading axis in
megatron-core 0.16) and the Transformer Engine names of the fused layer norms, whichever spec
built the model; the vocab-padded embedding/output rows may differ from the loading model's
padding (megatron marks them `allow_shape_mismatch`): pad rows are zero, so any TP loads them.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from megatron_s2lpo.config.model import ModelArch

from . import mapping as M
from .export import iter_flat_buckets
from .hf_io import HFReader, HFShardWriter, copy_aux_files
from .live import load_hf_state, unwrap_model

METADATA_NAME = "metadata.json"  # written by dist_checkpointing.save: marks a checkpoint dir
CONVERT_INFO_NAME = "convert_info.json"  # ours: source, architecture, layout at conversion
_MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")


def chunk_keys(num_chunks: int) -> list[str]:
    """State-dict keys of the model chunks, as Megatron-LM names them."""
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def build_conversion_chunks(arch: ModelArch, groups: Any, dtype: torch.dtype) -> list[Any]:
    """This rank's model chunks with `dtype` parameters and no random initialisation.

    No forward pass runs, so `variable_seq_lengths` (pipeline p2p shapes) is off: megatron-core
    0.16 rejects it together with its default MoE token dispatcher even in dense models. The
    local spec creates norm weights in fp32 whatever `params_dtype` says; the cast makes every
    parameter `dtype`, as the learner's bf16 models are.
    """
    from megatron_s2lpo.learner.model import build_model_chunks

    chunks = build_model_chunks(arch, groups, precision="fp32", params_dtype=dtype,
                                perform_initialization=False, variable_seq_lengths=False)
    return [chunk.to(dtype) for chunk in chunks]


def sharded_model_state(model_chunks: Sequence[Any], *, with_extra_state: bool = True) -> dict:
    """{"model": sharded state dict} (or model0, model1, ... per virtual stage)."""
    out = {}
    for key, chunk in zip(chunk_keys(len(model_chunks)), model_chunks):
        sd = chunk.sharded_state_dict()
        if not with_extra_state:
            sd = {k: v for k, v in sd.items() if not k.endswith("_extra_state")}
        out[key] = sd
    return out


def save_weights_checkpoint(model_chunks: Sequence[Any], out_dir: str) -> str:
    """A weights-only learner checkpoint root at step 0 (collective); returns the dist directory.

    Written by the learner's own `save_checkpoint` (layout in `learner/checkpoint.py`:
    `latest`, `step_00000000/{dist/, trainer_state.json, COMPLETE}`), so `Learner.load(out_dir,
    load_optimizer=False)` and the reference model load it. The RNG states of this process are
    removed: a training run must keep its own.
    """
    from megatron_s2lpo.learner.checkpoint import DIST_DIR, save_checkpoint

    step_dir = save_checkpoint(out_dir, 0, model_chunks=list(model_chunks))
    if dist.get_rank() == 0:
        shutil.rmtree(step_dir / "rng", ignore_errors=True)
    dist.barrier()
    return str(step_dir / DIST_DIR)


def resolve_checkpoint_dir(path: str) -> str:
    """The dist_checkpointing directory inside `path`.

    Accepts the dist directory itself, a learner checkpoint (`step_*/` with `dist/`), a learner
    checkpoint root (`latest` names the step), or a Megatron-LM save dir
    (`latest_checkpointed_iteration.txt`).
    """
    candidates = [path, os.path.join(path, "dist")]
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            candidates.append(os.path.join(path, f.read().strip(), "dist"))
    tracker = os.path.join(path, "latest_checkpointed_iteration.txt")
    if os.path.isfile(tracker):
        with open(tracker) as f:
            text = f.read().strip()
        candidates.append(os.path.join(path, "release" if text == "release" else f"iter_{int(text):07d}"))
    for candidate in candidates:
        if os.path.isfile(os.path.join(candidate, METADATA_NAME)):
            return candidate
    raise FileNotFoundError(f"{path} is not a megatron-core dist checkpoint (no {METADATA_NAME} in "
                            f"{candidates}); pass a learner checkpoint (root or step_* directory) or "
                            "a directory written by dist_checkpointing.save")


def _expected_tensors(sharded: dict) -> dict[str, tuple[tuple[int, ...], bool]]:
    """{checkpoint key: (global shape, allow_shape_mismatch)} of the requested ShardedTensors."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    out = {}
    stack = [sharded]
    while stack:
        node = stack.pop()
        values = node.values() if isinstance(node, dict) else node
        for value in values:
            if isinstance(value, ShardedTensorFactory):
                stack.append(value.build())
            elif isinstance(value, ShardedTensor):
                out[value.key] = (tuple(value.global_shape), value.allow_shape_mismatch)
            elif isinstance(value, (dict, list, tuple)):
                stack.append(value)
    return out


def check_checkpoint_tensors(ckpt_dir: str, model_chunks: Sequence[Any], arch: ModelArch) -> None:
    """Raise ValueError naming missing, unexpected and wrongly shaped model tensors (collective).

    Non-model keys (optimizer state, RNG) are ignored: a training checkpoint converts too.
    """
    from megatron.core import dist_checkpointing

    stored = {k: tuple(v.global_shape) for k, v in dist_checkpointing.load_tensors_metadata(ckpt_dir).items()}
    expected: dict[str, tuple[tuple[int, ...], bool]] = {}
    for chunk in model_chunks:
        expected.update(_expected_tensors(chunk.sharded_state_dict()))
    # a pipeline stage asks only for its own tensors: "unexpected" is judged against all ranks
    wanted: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(wanted, sorted(expected))
    wanted_anywhere = set().union(*wanted)
    missing = sorted(k for k in expected if k not in stored)
    unexpected = sorted(k for k in stored if k.startswith(_MODEL_PREFIXES) and k not in wanted_anywhere)
    if missing or unexpected:
        raise ValueError(
            f"megatron checkpoint {ckpt_dir} does not match the {arch.family} architecture of the HF "
            f"config: missing tensors {M.few_names(missing)}, unexpected tensors {M.few_names(unexpected)}"
            + (" (tie_word_embeddings differs?)" if "output_layer.weight" in missing + unexpected else "")
        )
    wrong = []
    for key, (shape, flexible) in sorted(expected.items()):
        found = stored[key]
        if flexible:  # vocab rows: any padding >= the tokenizer's vocabulary
            ok = len(found) == len(shape) and found[1:] == shape[1:] and found[0] >= arch.vocab_size
        else:
            ok = found == shape
        if not ok:
            wrong.append(f"tensor {key!r} has shape {found}, expected {shape}")
    if wrong:
        raise ValueError(f"megatron checkpoint {ckpt_dir} does not match the architecture {arch}: "
                         + "; ".join(wrong))


def checkpoint_dtype(ckpt_dir: str) -> torch.dtype:
    """dtype of the word embeddings in a dist checkpoint."""
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(ckpt_dir)
    if "embedding.word_embeddings.weight" not in meta:
        raise ValueError(f"megatron checkpoint {ckpt_dir} has no embedding.word_embeddings.weight: not a "
                         "GPT model checkpoint")
    return meta["embedding.word_embeddings.weight"].dtype


def load_mcore_checkpoint(model_chunks: Sequence[Any], ckpt_dir: str, arch: ModelArch) -> None:
    """Load the model weights of a dist checkpoint into the chunks (any TP/PP), checked first.

    Transformer Engine `_extra_state` objects (FP8 metadata) are not read: they carry no weights
    and differ between layer specs.
    """
    from megatron.core import dist_checkpointing

    ckpt_dir = resolve_checkpoint_dir(ckpt_dir)
    model_chunks = [unwrap_model(chunk) for chunk in model_chunks]
    check_checkpoint_tensors(ckpt_dir, model_chunks, arch)
    loaded = dist_checkpointing.load(sharded_model_state(model_chunks, with_extra_state=False), ckpt_dir)
    for key, chunk in zip(chunk_keys(len(model_chunks)), model_chunks):
        result = chunk.load_state_dict(loaded[key], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise ValueError(f"loading {ckpt_dir}: missing {missing}, unexpected {result.unexpected_keys}")


def hf_to_mcore_checkpoint(hf_dir: str, out_dir: str, groups: Any, *, dtype: torch.dtype | None = None,
                           progress: Callable[[int], Any] | None = None,
                           info: dict | None = None) -> ModelArch:
    """Convert a HF model directory into a dist checkpoint (collective over all ranks).

    dtype: parameter dtype of the checkpoint; None keeps the HF tensors' dtype. progress:
    called with the number of parameters loaded so far on this rank. info: extra entries for
    convert_info.json.
    """
    arch = ModelArch.from_hf_config(hf_dir)
    M.check_supported(arch)
    M.check_tp_size(arch, groups.tp_size)
    reader = HFReader(hf_dir)
    M.check_hf_names(arch, reader.names())
    dtype = dtype or reader.dtype()
    chunks = build_conversion_chunks(arch, groups, dtype)
    load_hf_state(chunks, groups.tp_rank, groups.tp_size, arch, reader, on_param=progress,
                  etp_rank=groups.etp_rank, etp_size=groups.etp_size)
    save_weights_checkpoint(chunks, out_dir)
    if dist.get_rank() == 0:
        info = {"source": os.path.abspath(hf_dir), "arch": arch.to_dict(),
                "tensor_parallel_size": groups.tp_size, "pipeline_parallel_size": groups.pp_size,
                "dtype": str(dtype).removeprefix("torch."), **(info or {})}
        with open(os.path.join(out_dir, CONVERT_INFO_NAME), "w") as f:
            json.dump(info, f, indent=2)
    dist.barrier()
    return arch


def mcore_to_hf_checkpoint(mcore_dir: str, out_dir: str, hf_config_dir: str, groups: Any, *,
                           max_shard_bytes: int = 5 * 10**9, bucket_bytes: int = 256 << 20,
                           dtype: torch.dtype | None = None,
                           progress: Callable[[int], Any] | None = None) -> list[str]:
    """Convert a dist checkpoint into a HF directory written by global rank 0.

    The architecture comes from `hf_config_dir/config.json`, which is copied with the tokenizer
    and generation config. dtype: of the written tensors; None keeps the checkpoint's. Returns
    the shard file names (on rank 0; [] elsewhere).
    """
    arch = ModelArch.from_hf_config(hf_config_dir)
    M.check_supported(arch)
    M.check_tp_size(arch, groups.tp_size)
    ckpt_dir = resolve_checkpoint_dir(mcore_dir)
    chunks = build_conversion_chunks(arch, groups, checkpoint_dtype(ckpt_dir))
    load_mcore_checkpoint(chunks, ckpt_dir, arch)
    writer = HFShardWriter(out_dir, max_shard_bytes) if dist.get_rank() == 0 else None
    done = 0
    for bucket in iter_flat_buckets(chunks, groups, arch, bucket_bytes):
        if writer is not None:  # the writer copies: the flat buffer is reused by the next bucket
            for name, tensor in bucket.tensors():
                writer.add(name, tensor if dtype is None else tensor.to(dtype))
        done += len(bucket.names)
        if progress is not None:
            progress(done)
    files = []
    if writer is not None:
        files = writer.close()
        copy_aux_files(hf_config_dir, out_dir)
    dist.barrier()
    return files
