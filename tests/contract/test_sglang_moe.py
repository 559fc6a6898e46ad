"""Qwen3-MoE weight sync and routing requests judged by SGLang 0.5.23's own code: its model's
`load_weights` takes every tensor our disk sync writes for a MoE learner (experts and router
included) into the right place, and its request types and routing encoding agree with our client.
See sglang_moe_checks.py for exactly which SGLang code runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_s2lpo.config.model import ModelArch
from megatron_s2lpo.convert import mapping as M
from megatron_s2lpo.convert.export import bucketize
from megatron_s2lpo.sync.disk import publish_hf_dir

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]
CHECKS = Path(__file__).with_name("sglang_moe_checks.py")
ARCH = ModelArch(family="qwen3_moe", vocab_size=96, hidden_size=32, ffn_hidden_size=48, num_layers=2,
                 num_attention_heads=4, num_query_groups=2, head_dim=8, qk_layernorm=True, num_experts=4,
                 num_experts_per_tok=2, moe_ffn_hidden_size=16, norm_topk_prob=True)


@pytest.fixture(scope="module")
def results(tmp_path_factory, sglang_source) -> dict:
    """What the disk sync writes for an EP=2 learner's shards, loaded by SGLang's model."""
    gen = torch.Generator().manual_seed(0)
    hf = {name: torch.randn(shape, generator=gen)
          for pm in M.param_maps(ARCH) for name, shape in zip(pm.hf_names, M.hf_shapes(pm, ARCH))}
    ranks = [M.hf_to_mcore_state(ARCH, hf, ep_size=2, ep_rank=r) for r in range(2)]  # each holds 2 experts
    exported = M.mcore_to_hf_state(ARCH, ranks, tp_size=1, ep_size=2)
    out = tmp_path_factory.mktemp("moe-sync")
    publish_hf_dir(str(out / "v1"), str(out / "v1.tmp"), bucketize(exported.items(), 1 << 16), arch=ARCH,
                   shard_bytes=1 << 16)
    proc = subprocess.run([sys.executable, str(CHECKS), str(out / "v1"), "--sglang-source", sglang_source],
                          capture_output=True, text=True, timeout=240)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def test_sglang_qwen3_moe_loader_takes_every_expert_and_router_tensor(results):
    assert results["num_tensors_sent"] == len(M.hf_names(ARCH))
    assert results["unwritten"] == []  # every SGLang parameter (w13 / w2 of every expert, gate) written
    assert results["mismatched"] == []  # and equal to our tensors in SGLang's stacked layout


def test_sglang_drops_dense_mlp_weights_of_a_moe_model_silently(results):
    # the reason ModelArch refuses Qwen3-MoE configs with mlp_only_layers / decoder_sparse_step
    assert results["dense_mlp_weight_silently_ignored"]


def test_routed_experts_request_and_answer_follow_sglang(results):
    assert results["payload_accepted"]
    assert results["start_len_default"] == 0  # the whole sequence: prompt and response
    assert results["routing_round_trip"]
