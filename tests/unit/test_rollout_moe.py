"""Mixture-of-experts rollouts on the CPU: the in-process engine serves a tiny Qwen3-MoE, takes its
weights under SGLang's per-expert names and returns the experts it routed every token to (equal to
a teacher-forced pass); the SGLang client's routed-experts wire format; routing through the
collector (learner samples only) and the pending-rollouts file."""

from __future__ import annotations

import base64

import pytest
import torch

from megatron_s2lpo.config import SamplingConfig
from megatron_s2lpo.config.model import ModelArch
from megatron_s2lpo.convert import mapping as M
from megatron_s2lpo.rollout import GroupCollector, LocalEngine
from megatron_s2lpo.rollout.engine import GenerateRequest
from megatron_s2lpo.rollout.sglang_client import EngineRequestError, generate_payload, parse_generate_output
from megatron_s2lpo.trainer.pipeline import decode_groups, encode_groups
from megatron_s2lpo.types import Prompt, Source

MOE = ModelArch(family="qwen3_moe", vocab_size=64, hidden_size=32, ffn_hidden_size=48, num_layers=2,
                num_attention_heads=4, num_query_groups=2, head_dim=8, qk_layernorm=True, num_experts=4,
                num_experts_per_tok=2, moe_ffn_hidden_size=16, norm_topk_prob=True)
DENSE = ModelArch(family="qwen3", vocab_size=64, hidden_size=32, ffn_hidden_size=48, num_layers=1,
                  num_attention_heads=4, num_query_groups=2, head_dim=8, qk_layernorm=True)


@pytest.fixture(scope="module")
def engine() -> LocalEngine:
    return LocalEngine.from_arch(MOE, init_seed=1)


def requests(routing: bool = True) -> list[GenerateRequest]:
    return [GenerateRequest(request_id=f"r{i}", prompt_ids=list(range(1, 3 + 2 * i)), max_new_tokens=4 + i,
                            seed=i, return_routed_experts=routing) for i in range(3)]


def test_routed_experts_equal_a_teacher_forced_pass(engine):
    for completion in engine.generate(requests()):
        rows = len(completion.prompt_ids) + len(completion.token_ids) - 1
        assert completion.routed_experts.shape == (rows, MOE.num_layers * MOE.num_experts_per_tok)
        sequence = torch.tensor([completion.prompt_ids + completion.token_ids[:-1]])
        with engine._routing.recording(True) as recorded:
            engine.model(input_ids=sequence)
        assert torch.equal(recorded.stacked(1)[0].to(torch.int16), completion.routed_experts)
    assert all(c.routed_experts is None for c in engine.generate(requests(routing=False)))


def test_weights_arrive_under_the_per_expert_checkpoint_names(engine, tmp_path):
    gen = torch.Generator().manual_seed(5)
    named = [(name, torch.randn(shape, generator=gen))
             for pm in M.param_maps(MOE) for name, shape in zip(pm.hf_names, M.hf_shapes(pm, MOE))]
    other = LocalEngine.from_arch(MOE, init_seed=2)
    other.update_weights_from_tensors(named, version=1)
    experts = other.model.model.layers[1].mlp.experts
    hf = dict(named)
    assert torch.equal(experts.gate_up_proj[3], torch.cat([hf["model.layers.1.mlp.experts.3.gate_proj.weight"],
                                                           hf["model.layers.1.mlp.experts.3.up_proj.weight"]]))
    assert torch.equal(experts.down_proj[2], hf["model.layers.1.mlp.experts.2.down_proj.weight"])
    engine_copy = LocalEngine.from_arch(MOE, init_seed=3)
    other.save_pretrained(str(tmp_path))  # transformers writes the per-expert names back
    engine_copy.update_weights_from_disk(str(tmp_path), version=2)
    assert all(torch.equal(a, b) for a, b in zip(other.model.state_dict().values(),
                                                 engine_copy.model.state_dict().values()))
    with pytest.raises(ValueError, match="unknown tensor name 'model.layers.0.mlp.experts.gate_up_proj'"):
        other.update_weights_from_tensors([("model.layers.0.mlp.experts.gate_up_proj", torch.zeros(4, 32, 32))], 3)


def test_a_dense_engine_refuses_routing_and_bf16_engines_sample():
    dense = LocalEngine.from_arch(DENSE, init_seed=0)
    with pytest.raises(ValueError, match="needs a mixture-of-experts model"):
        dense.generate(requests()[:1])
    bf16 = LocalEngine.from_arch(MOE, init_seed=1, dtype="bfloat16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    out = bf16.generate(requests())
    assert all(c.routed_experts is not None and all(lp <= 0 for lp in c.logprobs) for c in out)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        LocalEngine.from_arch(MOE, dtype="float16")


def _answer(routing: torch.Tensor | None) -> dict:
    meta = {"id": "r0", "finish_reason": {"type": "length"}, "weight_version": "1",
            "output_token_logprobs": [[-0.5, 7, None], [-0.25, 8, None]]}
    if routing is not None:
        meta["routed_experts"] = base64.b64encode(routing.to(torch.int32).numpy().tobytes()).decode()
    return {"text": "", "output_ids": [7, 8], "meta_info": meta}


def test_sglang_client_asks_for_and_parses_routed_experts():
    req = GenerateRequest(request_id="r0", prompt_ids=[1, 2, 3], max_new_tokens=2, return_routed_experts=True)
    assert generate_payload(req)["return_routed_experts"] is True
    assert "return_routed_experts" not in generate_payload(GenerateRequest(request_id="r1", prompt_ids=[1]))
    routing = torch.randint(0, 128, (4, 3, 8))  # prompt 3 + output 2 - 1 tokens, 3 layers, top-8
    out = parse_generate_output(_answer(routing), req, url="http://s")
    assert torch.equal(out.routed_experts, routing.view(4, 24).to(torch.int16))
    with pytest.raises(EngineRequestError, match="--enable-return-routed-experts"):
        parse_generate_output(_answer(None), req, url="http://s")
    with pytest.raises(EngineRequestError, match="do not split into 4 token rows"):
        parse_generate_output(_answer(routing[:3, :2, :3]), req, url="http://s")


def test_collector_asks_only_the_learners_engine_and_the_pending_file_keeps_routing(engine):
    explorer = LocalEngine.from_arch(DENSE, init_seed=0)
    prompts = [Prompt(prompt_id=f"p{i}", text="", ground_truth="1", token_ids=[1, 2 + i]) for i in range(2)]
    collector = GroupCollector(learner=engine, explorer=explorer, sampling=SamplingConfig(max_new_tokens=3),
                               group_size=4, t_mix=3, learner_routing=True)
    try:
        groups = collector.collect(prompts, step=2)  # 2 explorer + 2 learner samples per prompt
    finally:
        collector.close()
    for group in groups:
        for rollout in group.rollouts:
            assert (rollout.routed_experts is not None) == (rollout.source is Source.LEARNER)
            rollout.reward = 0.0
    step, decoded, _, _ = decode_groups(encode_groups(2, groups, 1.0, 0.5), {p.prompt_id: p for p in prompts}, where="f")
    for before, after in zip([r for g in groups for r in g.rollouts], [r for g in decoded for r in g.rollouts]):
        assert (after.routed_experts is None) == (before.routed_experts is None)
        if before.routed_experts is not None:
            assert torch.equal(after.routed_experts, before.routed_experts)
