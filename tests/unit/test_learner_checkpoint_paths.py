"""Checkpoint directory logic (latest pointer, completeness, validation, fallback, pruning) and
the CPU shim helpers.

The checkpoints here are made of torch.distributed.checkpoint's own metadata classes and a
shard laid out as its FileSystemWriter lays one out (byte items are torch.save'd objects at the
offsets the metadata records); the save/load round trips run with real megatron-core in
tests/distributed.
"""

import io
import json
import logging
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_s2lpo.learner import checkpoint as ckpt
from megatron_s2lpo.learner.checkpoint_files import CorruptCheckpointError, check_checkpoint, read_rng_file
from megatron_s2lpo.learner.cpu_shims import _CpuTorch, cpu_tensor_methods


def _write_dist(dist_dir: Path, items: dict) -> None:
    """A DCP directory whose items are all byte items (torch.save'd objects), in one shard."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, MetadataIndex

    shard, storage, offset = b"", {}, 0
    for fqn, blob in items.items():
        raw = blob if isinstance(blob, bytes) else _saved(blob)
        storage[MetadataIndex(fqn)] = _StorageInfo("__0_0.distcp", offset, len(raw))
        shard, offset = shard + raw, offset + len(raw)
    dist_dir.mkdir(parents=True)
    (dist_dir / "__0_0.distcp").write_bytes(shard)
    metadata = Metadata(state_dict_metadata={fqn: BytesStorageMetadata() for fqn in items}, storage_data=storage)
    (dist_dir / ".metadata").write_bytes(pickle.dumps(metadata))
    (dist_dir / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    (dist_dir / "common.pt").write_bytes(_saved({}))  # megatron's non-sharded state, always written


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _rng() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(), "tracker": {},
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                      "has_gauss": has_gauss, "cached_gaussian": cached}}


def _fake_checkpoint(root: Path, step: int, complete: bool = True, items: dict | None = None) -> Path:
    path = root / ckpt.step_dir_name(step)
    _write_dist(path / ckpt.DIST_DIR, items or {"optimizer.param_groups": {"lr": 0.1, "betas": (0.9, 0.99)}})
    (path / "rng").mkdir()
    (path / "rng" / "rank_00000.pt").write_bytes(_saved(_rng()))
    if complete:
        (path / ckpt.STATE_FILE).write_text('{"step": %d}' % step)
        (path / ckpt.COMPLETE).write_text("")
    return path


class Planted:
    """Unpickling this runs code: it creates the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_latest_follows_pointer_and_falls_back(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.latest_checkpoint(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no loadable checkpoint"):
        ckpt.latest_checkpoint(tmp_path)
    s3, s5 = _fake_checkpoint(tmp_path, 3), _fake_checkpoint(tmp_path, 5)
    _fake_checkpoint(tmp_path, 9, complete=False)  # a save that died before COMPLETE
    (tmp_path / ".tmp-step_00000011").mkdir()  # a save that died before the rename
    assert ckpt.latest_checkpoint(tmp_path) == s5  # no pointer: highest complete
    ckpt._write_file_atomic(tmp_path / ckpt.LATEST, "step_00000003\n")
    assert ckpt.latest_checkpoint(tmp_path) == s3  # the pointer wins
    assert not (tmp_path / "latest.tmp").exists()
    ckpt._write_file_atomic(tmp_path / ckpt.LATEST, "step_00000009\n")  # points at an incomplete one
    assert ckpt.latest_checkpoint(tmp_path) == s5


def test_resolve_checkpoint_errors(tmp_path):
    _fake_checkpoint(tmp_path, 9, complete=False)
    with pytest.raises(ValueError, match="incomplete"):
        ckpt.resolve_checkpoint(tmp_path / "step_00000009")
    with pytest.raises(FileNotFoundError):
        ckpt.resolve_checkpoint(tmp_path / "step_00000010")
    good = _fake_checkpoint(tmp_path, 10)
    assert ckpt.resolve_checkpoint(good) == good and ckpt.resolve_checkpoint(tmp_path) == good


def test_the_rng_file_round_trips_as_plain_data(tmp_path):
    state = _rng()
    path = tmp_path / "rank_00000.pt"
    path.write_bytes(_saved(state))
    loaded = read_rng_file(path)
    assert loaded["python"] == random.getstate() and torch.equal(loaded["torch"], state["torch"])
    assert torch.equal(loaded["numpy"]["keys"], state["numpy"]["keys"])


@pytest.mark.parametrize("where", ["rng", "metadata", "byte_item"])
def test_a_planted_pickle_is_refused_never_run(tmp_path, where):
    """The RNG file (our torch.load), torch DCP's .metadata (its pickle.load) and a shard's byte
    item (its torch.load(weights_only=False)): each is refused by the validation every load runs
    first, and the planted code never runs."""
    marker = tmp_path / "pwned"
    good = _fake_checkpoint(tmp_path, 1)
    bad = _fake_checkpoint(tmp_path, 2, items={"x": pickle.dumps(Planted(marker))} if where == "byte_item" else None)
    if where == "rng":
        (bad / "rng" / "rank_00000.pt").write_bytes(_saved(Planted(marker)))
        bad_file = bad / "rng" / "rank_00000.pt"
    elif where == "metadata":
        (bad / "dist" / ".metadata").write_bytes(pickle.dumps(Planted(marker)))
        bad_file = bad / "dist" / ".metadata"
    else:
        bad_file = bad / "dist" / "__0_0.distcp"
    with pytest.raises(CorruptCheckpointError) as err:
        check_checkpoint(bad, 2)
    assert err.value.file == bad_file and not marker.exists()
    assert ckpt.latest_checkpoint(tmp_path) == good and not marker.exists()
    with pytest.raises(ValueError, match="cannot be loaded"):  # a named checkpoint never falls back
        ckpt.resolve_checkpoint(bad)
    assert not marker.exists()


def _truncate(path: Path, keep: int = 10) -> None:
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize("damage, bad_name", [
    (lambda p: _truncate(p / "dist" / "__0_0.distcp"), "__0_0.distcp"),
    (lambda p: (p / "dist" / "__0_0.distcp").unlink(), "__0_0.distcp"),
    (lambda p: _truncate(p / "dist" / ".metadata"), ".metadata"),
    (lambda p: _truncate(p / "dist" / "metadata.json", 5), "metadata.json"),
    (lambda p: _truncate(p / "rng" / "rank_00000.pt", 100), "rank_00000.pt"),
    (lambda p: _truncate(p / "trainer_state.json", 5), "trainer_state.json"),
    (lambda p: (p / "trainer_state.json").write_text('{"step": 7}'), "trainer_state.json"),
])
def test_a_damaged_newest_checkpoint_falls_back_with_a_warning_naming_the_file(tmp_path, caplog, damage, bad_name):
    previous = _fake_checkpoint(tmp_path, 4)
    newest = _fake_checkpoint(tmp_path, 6)
    ckpt._write_file_atomic(tmp_path / ckpt.LATEST, "step_00000006\n")
    damage(newest)
    with caplog.at_level(logging.WARNING, logger="megatron_s2lpo.learner.checkpoint"):
        assert ckpt.latest_checkpoint(tmp_path) == previous
    (record,) = caplog.records
    assert f"checkpoint {newest} cannot be loaded" in record.message and bad_name in record.message
    assert "falling back to step_00000004" in record.message
    damage(previous)  # nothing left to load: the error lists what was found and why
    with pytest.raises(FileNotFoundError, match=rf"no loadable checkpoint under {tmp_path} .*; found:\n  "
                                                rf"step_00000006: .*{bad_name}.*\n  step_00000004: .*{bad_name}"):
        ckpt.latest_checkpoint(tmp_path)


def test_prune_keeps_newest_and_latest(tmp_path):
    paths = [_fake_checkpoint(tmp_path, s) for s in (1, 2, 3, 4)]
    ckpt._write_file_atomic(tmp_path / ckpt.LATEST, "step_00000001\n")  # e.g. after a manual rollback
    removed = ckpt.prune_checkpoints(tmp_path, keep=2)
    assert removed == [paths[1]]
    assert [p.exists() for p in paths] == [True, False, True, True]
    with pytest.raises(ValueError, match="keep"):
        ckpt.prune_checkpoints(tmp_path, keep=0)


def test_cpu_torch_maps_cuda_literals_to_cpu():
    fake = _CpuTorch(torch)
    assert fake.zeros(2, device="cuda").device.type == "cpu"
    assert fake.tensor([1.0], device="cuda:0", pin_memory=True).device.type == "cpu"
    assert fake.float32 is torch.float32 and fake.Tensor is torch.Tensor


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shim is a no-op with CUDA")
def test_cpu_tensor_methods_is_scoped():
    x = torch.zeros(2)
    with cpu_tensor_methods():
        assert x.type() == "torch.cuda.FloatTensor" and x.cuda() is x
        assert x.type(torch.float64).dtype == torch.float64  # conversions still work
    assert x.type() == "torch.FloatTensor"
