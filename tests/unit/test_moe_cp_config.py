"""Mixture-of-experts and context-parallel options without megatron: config validation, the planner
on the Qwen3-30B-A3B recipe, and which tokens a context-parallel rank holds."""

from __future__ import annotations

import os

import pytest
import torch

from megatron_s2lpo.config import load_config
from megatron_s2lpo.config.learner import LearnerConfig
from megatron_s2lpo.learner.context_parallel import combine, local_of_global, local_token_index
from megatron_s2lpo.planner import check_fits
from megatron_s2lpo.planner.archs import known_arch
from megatron_s2lpo.planner.estimate import GIB, estimate_learner, expert_params, stage_params

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(REPO, "examples", "qwen3_30b_a3b_explorer_4b.yaml")


@pytest.mark.parametrize("field,value,match", [
    ("routing_replay", "r4", "routing_replay must be one of"),
    ("moe_token_dispatcher", "deepep", "moe_token_dispatcher must be one of"),
    ("expert_model_parallel_size", 0, "expert_model_parallel_size must be >= 1"),
    ("moe_aux_loss_coeff", -1.0, "moe_aux_loss_coeff must be >= 0"),
    ("routing_metrics_every", -1, "routing_metrics_every must be >= 0"),
])
def test_learner_moe_fields_are_checked(field, value, match):
    with pytest.raises(ValueError, match=match):
        LearnerConfig(**{field: value})


def test_r3_with_an_sglang_learner_needs_its_routing(tmp_path):
    with pytest.raises(ValueError, match="rollout.learner.return_routed_experts=true"):
        load_config(RECIPE, ["rollout.learner.return_routed_experts=false"])
    assert load_config(RECIPE, ["learner.routing_replay=r2", "rollout.learner.return_routed_experts=false"])


def test_dense_learner_refuses_moe_options():
    from megatron_s2lpo.learner.learner import check_moe_options

    dense = known_arch("Qwen3-8B-Base")
    with pytest.raises(ValueError, match="learner.routing_replay='r3' applies to mixture-of-experts learners"):
        check_moe_options(dense, LearnerConfig(routing_replay="r3"))
    with pytest.raises(ValueError, match="needs learner.sequence_parallel=true"):
        check_moe_options(known_arch("Qwen3-30B-A3B"), LearnerConfig(tensor_parallel_size=2))


def test_planner_spreads_the_experts_and_sizes_the_recipe():
    moe = known_arch("Qwen3-30B-A3B-Base")
    assert moe.num_experts == 128 and round(moe.num_params() / 1e9, 1) == 30.5
    assert round(moe.num_active_params() / 1e9, 1) == 3.4
    per_gpu = stage_params(moe, 1, 1, 0, ep=8)[0]
    assert per_gpu < stage_params(moe, 1, 1, 0, ep=1)[0] / 5  # the experts are 95% of the weights
    assert expert_params(moe, 1, ep=8) == pytest.approx(moe.num_layers * 16 * 3 * 2048 * 768)
    cfg = load_config(RECIPE)
    report = check_fits(cfg, 80, num_learner_gpus=32)
    assert report.fits, report.text()
    assert "EP=8 ETP=1 (16 of 128 experts per GPU)" in report.text()
    sharded = estimate_learner(moe, cfg.learner, dp_size=32, max_seq_len=5120, with_reference=True)
    unsharded = estimate_learner(moe, LearnerConfig(**{**_fields(cfg.learner), "expert_model_parallel_size": 1}),
                                 dp_size=32, max_seq_len=5120, with_reference=True)
    assert sharded.item("weights") < unsharded.item("weights") / 5
    assert not check_fits(load_config(RECIPE, ["learner.expert_model_parallel_size=1"]), 80, num_learner_gpus=32).fits
    # full recompute, unlike the dense recipes: 16k tokens of routed activations need it
    assert not check_fits(load_config(RECIPE, ["learner.recompute_granularity=none"]), 80, num_learner_gpus=32).fits
    assert sharded.peak < 80 * GIB


def test_host_memory_holds_this_ranks_experts_only():
    """The pinned reference and the checkpoint staging of an EP rank hold its own experts, as its
    GPU does, not the whole model's."""
    from megatron_s2lpo.planner.host import estimate_host

    cfg = load_config(RECIPE)
    run = check_fits(cfg, 80, num_learner_gpus=32).runs[0]
    host = {item.name: item.bytes for item in run.host.items}
    assert host["reference"] == pytest.approx(run.learner.item("weights"))
    dense_experts = estimate_host(known_arch("Qwen3-30B-A3B-Base"), LearnerConfig(**{
        **_fields(cfg.learner), "expert_model_parallel_size": 1}), dp_size=32, with_reference=True, ranks_per_node=8)
    assert run.host.per_rank < dense_experts.per_rank / 4


def _fields(cfg: LearnerConfig) -> dict:
    return {name: getattr(cfg, name) for name in cfg.__dataclass_fields__}


def test_context_parallel_ranks_hold_mirrored_chunks_of_every_sequence():
    cu = torch.tensor([0, 8, 12])  # sequences of 8 and 4 tokens, CP=2: chunks of 2 and 1
    assert local_token_index(cu, 2, 0).tolist() == [0, 1, 6, 7, 8, 11]
    assert local_token_index(cu, 2, 1).tolist() == [2, 3, 4, 5, 9, 10]
    both = torch.cat([local_token_index(cu, 2, r) for r in range(2)])
    assert sorted(both.tolist()) == list(range(12))
    assert local_of_global(cu, 2, 1).tolist() == [-1, -1, 0, 1, 2, 3, -1, -1, -1, 4, 5, -1]
    with pytest.raises(ValueError, match="2 x CP = 4 chunks"):
        local_token_index(torch.tensor([0, 6]), 2, 0)
    values = torch.ones(2, 3)
    assert combine(values, None) is values
