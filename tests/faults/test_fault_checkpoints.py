"""Every file a resume or `s2lpo convert mcore-to-hf` reads, planted with a pickle or damaged in place.

Planted pickles (each would create a canary file if unpickled): torch.distributed.checkpoint's
`.metadata`, a byte item of a shard, the same item marked zstd-compressed (torch's reader
decompresses it and unpickles it with weights_only=False), megatron's `common.pt`, an RNG file.
Size-preserving damage: a flipped byte in a tensor item's zip header, a missing `common.pt`,
metadata.json naming another backend, a trainer state without `sampler`. The one-step pipeline's
pending rollouts: deleted, cut, token ids out of the vocabulary, a log-prob of +50.

Each newest checkpoint is broken a different way and the oldest is intact: the resume must name
every bad file in a warning, fall back to the intact one and then log exactly what the
uninterrupted run logged; the converter must fall back the same way for a checkpoint root and
refuse a named bad checkpoint with a message, never a traceback. The canary must never exist.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fault_runs import (AHEAD, NUM_STEPS, REPO_ROOT, RUN_TIMEOUT_S, copy_run, differences, metrics, planted_bytes,
                      step_dir, train, Planted)

from megatron_s2lpo.learner.checkpoint_files import read_dcp_metadata


def _byte_item(dist_dir: Path) -> tuple[object, str]:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = read_dcp_metadata(dist_dir)
    fqn = next(k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata))
    return metadata, fqn


def plant_byte_item(step: Path, canary: Path, *, zstd: bool = False) -> Path:
    """Point a byte item of the step's shard at a planted pickle (appended to the shard), optionally
    zstd-compressed and marked so in the metadata, as torch's writer marks a compressed item."""
    dist_dir = step / "dist"
    metadata, fqn = _byte_item(dist_dir)
    payload = planted_bytes(canary)
    if zstd:
        import zstandard

        payload = zstandard.ZstdCompressor().compress(payload)
    index = next(i for i in metadata.storage_data if i.fqn == fqn)
    info = metadata.storage_data[index]
    shard = dist_dir / info.relative_path
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(payload)
    metadata.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(payload),
                                                       transform_descriptors=["stream.zstd/1"] if zstd else None)
    (dist_dir / ".metadata").write_bytes(pickle.dumps(metadata))
    return shard


def torch_saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def flip_tensor_header(step: Path) -> Path:
    """Flip one byte of the first tensor item's zip header (its file-name length): sizes unchanged."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    dist_dir = step / "dist"
    metadata = read_dcp_metadata(dist_dir)
    index = next(i for i in metadata.storage_data
                 if isinstance(metadata.state_dict_metadata[i.fqn], TensorStorageMetadata))
    info = metadata.storage_data[index]
    shard = dist_dir / info.relative_path
    data = bytearray(shard.read_bytes())
    assert data[info.offset:info.offset + 4] == b"PK\x03\x04"
    data[info.offset + 26] ^= 0x01  # local header: file name length
    shard.write_bytes(bytes(data))
    return shard


def convert(mcore: Path, out: Path, hf_config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_s2lpo.cli", "convert", "mcore-to-hf", "--mcore", str(mcore),
                           "--out", str(out), "--hf-config", str(hf_config)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT_S)


def resume(run_dir: Path, *extra: str) -> str:
    proc = train(run_dir, *extra, "--resume")
    return proc.stdout + proc.stderr


def assert_fell_back(output: str, bad_files: list[Path], to_step: int) -> None:
    for bad in bad_files:
        assert f"cannot be loaded ({bad}" in output, f"no warning names {bad}:\n{output[-4000:]}"
    assert f"falling back to step_{to_step:08d}" in output


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_planted_pickles_never_run_in_a_resume_or_a_conversion(reference, tmp_path: Path) -> None:
    run = copy_run(reference["sync"], tmp_path / "run")
    canary = tmp_path / "canary"
    (step_dir(run, 6) / "dist" / ".metadata").write_bytes(planted_bytes(canary))
    planted = [step_dir(run, 6) / "dist" / ".metadata", plant_byte_item(step_dir(run, 5), canary),
               plant_byte_item(step_dir(run, 4), canary, zstd=True), step_dir(run, 3) / "dist" / "common.pt",
               step_dir(run, 2) / "rng" / "rank_00000.pt"]
    for path in planted[3:]:
        path.write_bytes(torch_saved(Planted(canary)))
    hf_config = run / "models" / "learner"
    # the converter, on the checkpoint root: falls back to step 1 (the only intact one) and converts it
    proc = convert(run / "checkpoints", tmp_path / "hf", hf_config)
    assert not canary.exists(), "a planted pickle ran in the converter"
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_fell_back(proc.stderr, planted, 1)
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file() or any((tmp_path / "hf").glob("*.safetensors"))
    # ... and on a named checkpoint: refused with the file, no traceback
    for step, bad in ((6, planted[0]), (5, planted[1]), (4, planted[2])):
        proc = convert(step_dir(run, step), tmp_path / f"hf{step}", hf_config)
        assert proc.returncode == 2 and str(bad) in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not canary.exists(), "a planted pickle ran in the converter"
    # the trainer: the same fallback, then exactly the uninterrupted run's steps 2-6
    output = resume(run)
    assert not canary.exists(), "a planted pickle ran in the trainer"
    assert_fell_back(output, planted, 1)
    assert differences(metrics(reference["sync"]), metrics(run)) == []


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_damage_that_keeps_sizes_falls_back_or_is_refused_clearly(reference, tmp_path: Path) -> None:
    run = copy_run(reference["sync"], tmp_path / "run")
    flipped = flip_tensor_header(step_dir(run, 6))
    common = step_dir(run, 5) / "dist" / "common.pt"
    common.unlink()
    backend = step_dir(run, 4) / "dist" / "metadata.json"
    backend.write_text(backend.read_text().replace('"torch_dist"', '"zarr"'))
    state_file = step_dir(run, 3) / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["trainer_state"]["sampler"]
    state_file.write_text(json.dumps(state))
    proc = convert(step_dir(run, 6), tmp_path / "hf", run / "models" / "learner")
    assert proc.returncode == 2 and str(flipped) in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    output = resume(run)
    assert_fell_back(output, [flipped, common, backend, state_file], 2)
    assert "lacks ['sampler']" in output
    assert differences(metrics(reference["sync"]), metrics(run)) == []


def _tamper_pending(step: Path, change) -> Path:
    """Change the decoded columns of a pending rollouts file and record the new file's size and
    sha256 in the trainer state, as if the checkpoint had been saved so: only the rollout checks
    can refuse it."""
    from safetensors.torch import load, save

    from megatron_s2lpo.trainer.pipeline import PENDING_FILE

    path = step / PENDING_FILE
    tensors = load(path.read_bytes())
    change(tensors)
    data = save(tensors)
    path.write_bytes(data)
    state_file = step / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state.setdefault("files", {})[PENDING_FILE] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    state_file.write_text(json.dumps(state))
    return path


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_damaged_pending_rollouts_are_never_regenerated_or_trained_on(reference, tmp_path: Path) -> None:
    from megatron_s2lpo.trainer.pipeline import PENDING_FILE

    run = copy_run(reference["ahead"], tmp_path / "run")
    shutil.rmtree(step_dir(run, 6))  # the last step has nothing pending: the run was killed before saving it
    (run / "checkpoints" / "latest").write_text("step_00000005\n")
    deleted = step_dir(run, 5) / PENDING_FILE
    deleted.unlink()
    cut = step_dir(run, 4) / PENDING_FILE
    cut.write_bytes(cut.read_bytes()[:-100])

    def out_of_vocabulary(tensors):
        tensors["response_ids"][0] = 10**6

    def above_zero(tensors):
        tensors["response_logprobs"][0] = 50.0

    bad_ids = _tamper_pending(step_dir(run, 3), out_of_vocabulary)
    bad_logprob = _tamper_pending(step_dir(run, 2), above_zero)
    output = resume(run, *AHEAD)
    assert_fell_back(output, [deleted, cut], 1)
    assert f"{bad_ids} is damaged" in output and "outside the learner's vocabulary" in output
    assert f"{bad_logprob} is damaged" in output and "above 0" in output
    assert differences(metrics(reference["ahead"]), metrics(run)) == []


def test_a_model_directory_with_a_planted_pickle_never_runs_it(tmp_path: Path) -> None:
    """The cached models a resume reads (<run.output_dir>/models/<name>): a pickled `pytorch_model.bin`
    where the safetensors were is refused by both readers (the learner's HFReader reads safetensors
    only; transformers loads a .bin with weights_only=True)."""
    from transformers import Qwen3Config

    from megatron_s2lpo.convert.hf_io import HFReader
    from megatron_s2lpo.rollout.local import LocalEngine

    model_dir = tmp_path / "models" / "learner"
    Qwen3Config(vocab_size=101, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=8).save_pretrained(model_dir)
    canary = tmp_path / "canary"
    (model_dir / "pytorch_model.bin").write_bytes(torch_saved(Planted(canary)))
    with pytest.raises(Exception):  # noqa: B017 - each reader words it its own way; what matters is below
        HFReader(str(model_dir))
    with pytest.raises(Exception):  # noqa: B017
        LocalEngine.from_pretrained(str(model_dir))
    assert not canary.exists()


def test_a_zstd_marked_item_is_refused_where_no_zstd_module_can_check_it(tmp_path: Path, monkeypatch) -> None:
    """torch's reader fails on such an item without a zstd module (and runs its pickle with one):
    the validation refuses it either way, naming the file, so a resume falls back instead."""
    import torch.distributed.checkpoint as dcp

    from megatron_s2lpo.learner.checkpoint_files import CorruptCheckpointError, check_checkpoint

    step = tmp_path / "step_00000001"  # a checkpoint of one byte item and one tensor, as torch writes them
    dcp.save({"extra": {"plain": 1}, "weight": torch.ones(4)}, checkpoint_id=str(step / "dist"), no_dist=True)
    (step / "dist" / "metadata.json").write_text('{"sharded_backend": "torch_dist", "common_backend": "torch"}')
    (step / "dist" / "common.pt").write_bytes(torch_saved({}))
    (step / "trainer_state.json").write_text('{"step": 1}')
    (step / "COMPLETE").write_text("")
    check_checkpoint(step, 1)
    canary = tmp_path / "canary"
    shard = plant_byte_item(step, canary, zstd=True)
    with pytest.raises(CorruptCheckpointError, match="is not plain data") as err:
        check_checkpoint(step, 1)
    assert err.value.file == shard
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import zstandard -> ImportError
    monkeypatch.setitem(sys.modules, "pyzstd", None)
    with pytest.raises(CorruptCheckpointError, match="zstd-compressed and no zstd module"):
        check_checkpoint(step, 1)
    assert not canary.exists()
