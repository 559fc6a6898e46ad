"""Checkpoint directory logic (latest pointer, completeness, pruning) and the CPU shim helpers.

The save/load round trips run with real megatron-core in tests/distributed.
"""

from pathlib import Path

import pytest
import torch

from megatron_s2lpo.learner import checkpoint as ckpt
from megatron_s2lpo.learner.cpu_shims import _CpuTorch, cpu_tensor_methods


def _fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    path = root / ckpt.step_dir_name(step)
    (path / ckpt.DIST_DIR).mkdir(parents=True)
    if complete:
        (path / ckpt.STATE_FILE).write_text('{"step": %d}' % step)
        (path / ckpt.COMPLETE).write_text("")
    return path


def test_latest_follows_pointer_and_falls_back(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.latest_checkpoint(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
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
