"""Frozen engines stay frozen (rollout/frozen.py): the fingerprint check on the in-process engine.

The same guard runs in the trainer before every collection (trainer/pipeline.RolloutStage) and on
--resume against the first start's fingerprint (tests/integration/test_train.py).
"""

from __future__ import annotations

import json

import pytest
import torch

from megatron_s2lpo.config.model import ModelArch
from megatron_s2lpo.rollout.frozen import FrozenGuard, FrozenWeightsError, fingerprint
from megatron_s2lpo.rollout.local import LocalEngine

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = ModelArch(family="qwen3", vocab_size=80, hidden_size=32, ffn_hidden_size=64, num_layers=1,
                 num_attention_heads=4, num_query_groups=2, head_dim=8, qk_layernorm=True)


class Restartable(LocalEngine):
    """The in-process engine with the counters an SGLang engine reports."""

    num_restarts = 0
    num_memory_releases = 0


def lose_weights(engine: LocalEngine) -> None:
    """What a memory release without a CPU backup leaves behind: other numbers in the weights."""
    name = "model.layers.0.mlp.down_proj.weight"
    shape = engine.model.state_dict()[name].shape
    engine.update_weights_from_tensors([(name, torch.randn(shape) * 0.5)], version=0)


def test_offload_onload_keeps_the_fingerprint_and_lost_weights_fail_the_check():
    engine = Restartable.from_arch(ARCH, init_seed=1)
    guard = FrozenGuard(engine, "explorer", vocab_size=80, tolerance=1e-6)
    engine.offload()
    engine.onload()
    assert guard.check("an offload / onload") == 0.0  # the same weights give the same log-probs
    lose_weights(engine)
    with pytest.raises(FrozenWeightsError, match="frozen explorer engine .* after a memory release"):
        guard.check("a memory release")


def test_checks_run_after_restarts_and_releases_and_every_n_steps():
    engine = Restartable.from_arch(ARCH, init_seed=2)
    guard = FrozenGuard(engine, "teacher", vocab_size=80, tolerance=1e-6)
    assert guard.check_if_disturbed(1) is None and guard.num_checks == 0  # nothing happened: no cost
    engine.num_restarts = 1
    assert guard.check_if_disturbed(2) == 0.0 and guard.num_checks == 1
    assert guard.check_if_disturbed(3) is None  # the restart was seen
    assert guard.check_if_disturbed(4, every=2) == 0.0 and guard.num_checks == 2
    lose_weights(engine)
    engine.num_memory_releases = 1
    with pytest.raises(FrozenWeightsError, match="1 memory release"):
        guard.check_if_disturbed(5)


def test_a_resume_compares_with_the_first_starts_fingerprint(tmp_path):
    path = str(tmp_path / "frozen_fingerprints.json")
    engine = Restartable.from_arch(ARCH, init_seed=3)
    FrozenGuard(engine, "explorer", vocab_size=80, tolerance=1e-6, path=path)
    saved = json.loads(open(path).read())
    assert saved["explorer"] == fingerprint(engine, vocab_size=80) and len(saved["explorer"]) == 4
    FrozenGuard(Restartable.from_arch(ARCH, init_seed=3), "explorer", vocab_size=80, tolerance=1e-6, path=path,
                compare_saved=True)  # the same model again: fine
    with pytest.raises(FrozenWeightsError, match="after the run was resumed"):
        FrozenGuard(Restartable.from_arch(ARCH, init_seed=4), "explorer", vocab_size=80, tolerance=1e-6,
                    path=path, compare_saved=True)
