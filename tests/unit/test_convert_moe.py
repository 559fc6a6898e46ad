"""Qwen3-MoE: the architecture read from a Hugging Face config, and the pure HF <-> megatron maps of
router and experts (no megatron import): names equal transformers' checkpoint names, bit-exact
round trips over every (TP, EP, expert-TP) layout of up to 4 ranks, clear errors."""

import pytest
import torch

from megatron_s2lpo.config.model import ModelArch
from megatron_s2lpo.convert import mapping as M

MOE = ModelArch(family="qwen3_moe", vocab_size=200, hidden_size=32, ffn_hidden_size=48, num_layers=2,
                num_attention_heads=4, num_query_groups=2, head_dim=8, qk_layernorm=True, num_experts=4,
                num_experts_per_tok=2, moe_ffn_hidden_size=16, norm_topk_prob=True)


def random_hf_state(arch: ModelArch, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen)
            for pm in M.param_maps(arch) for name, shape in zip(pm.hf_names, M.hf_shapes(pm, arch))}


def test_arch_round_trips_through_a_transformers_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.for_model(**MOE.to_hf_config_dict())
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    model.save_pretrained(tmp_path)  # transformers 5 writes num_local_experts, not num_experts
    assert ModelArch.from_hf_config(str(tmp_path)) == MOE
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        saved = set(f.keys())
    # the checkpoint names (per expert, as on the hub and as SGLang loads them) are ours
    assert saved == set(M.hf_names(MOE))
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in saved
    assert MOE.num_params() == sum(p.numel() for p in model.parameters())
    active = MOE.num_params() - MOE.num_layers * 2 * 3 * 32 * 16  # two of four experts unused per token
    assert MOE.num_active_params() == active


@pytest.mark.parametrize("tp,ep,etp", [(1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 1), (1, 2, 2), (2, 1, 2),
                                       (1, 4, 1), (4, 1, 1)])
@pytest.mark.parametrize("naming,grouped", [("local", False), ("te", False), ("te", True)])
def test_round_trip_is_bit_exact(tp, ep, etp, naming, grouped):
    hf = random_hf_state(MOE, seed=tp + 10 * ep + 100 * etp)
    world = max(tp, ep * etp)
    states = []
    for rank in range(world):
        states.append(M.hf_to_mcore_state(MOE, hf, tp_size=tp, tp_rank=rank % tp, naming=naming, ep_size=ep,
                                          ep_rank=(rank // etp) % ep, etp_size=etp, etp_rank=rank % etp,
                                          grouped=grouped))
    experts = [M.expert_of(n) for n in states[0] if M.expert_of(n) is not None]
    assert sorted(set(experts)) == list(range(MOE.num_experts // ep))  # rank 0 holds the first share
    assert M.detect_grouped(list(states[0])) == grouped
    fc1 = states[0][M.expert_name(0, 0, 1, grouped)]
    assert tuple(fc1.shape) == (2 * MOE.moe_ffn_hidden_size // etp, MOE.hidden_size)
    norm = "decoder.layers.0.pre_mlp_layernorm.weight"  # MoE layers keep it under both specs
    assert norm in states[0]
    back = M.mcore_to_hf_state(MOE, states, tp_size=tp, ep_size=ep, etp_size=etp)
    assert list(back) == M.hf_names(MOE)
    for name in hf:
        assert torch.equal(back[name], hf[name]), name


def test_expert_weights_fuse_as_megatron_and_sglang_stack_them():
    hf = random_hf_state(MOE)
    state = M.hf_to_mcore_state(MOE, hf)
    h = "model.layers.1.mlp."
    assert torch.equal(state["decoder.layers.1.mlp.router.weight"], hf[h + "gate.weight"])
    assert torch.equal(state[M.expert_name(1, 2, 1)], torch.cat([hf[h + "experts.2.gate_proj.weight"],
                                                                 hf[h + "experts.2.up_proj.weight"]]))
    assert torch.equal(state[M.expert_name(1, 2, 2)], hf[h + "experts.2.down_proj.weight"])
    assert M.renumber_expert(M.expert_name(1, 2, 1), 7) == M.expert_name(1, 7, 1)
    assert M.renumber_expert(M.expert_name(1, 2, 2, grouped=True), 7) == M.expert_name(1, 7, 2, grouped=True)
    assert M.expert_owner(5, 8, 4) == (2, 1)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="num_experts .4. is not divisible by expert parallel size 3"):
        M.check_expert_parallel(MOE, 3)
    with pytest.raises(ValueError, match="moe_ffn_hidden_size"):
        M.check_expert_parallel(MOE, 1, 3)
    dense = ModelArch(family="qwen3", vocab_size=8, hidden_size=8, ffn_hidden_size=8, num_layers=1,
                      num_attention_heads=2, num_query_groups=2, head_dim=4)
    with pytest.raises(ValueError, match="needs a mixture-of-experts model"):
        M.check_expert_parallel(dense, 2)
    cfg = MOE.to_hf_config_dict()
    with pytest.raises(ValueError, match="SGLang 0.5.23 serves every layer as MoE"):
        ModelArch.from_hf_config({**cfg, "mlp_only_layers": [1]})
    with pytest.raises(ValueError, match="missing required field"):
        ModelArch.from_hf_config({k: v for k, v in cfg.items() if k != "moe_intermediate_size"})
    with pytest.raises(ValueError, match="num_experts_per_tok must be in"):
        ModelArch(**{**MOE.to_dict(), "num_experts_per_tok": 5})
    with pytest.raises(ValueError, match="dense qwen3 model"):
        ModelArch(**{**dense.to_dict(), "num_experts": 2})
    hf = random_hf_state(MOE)
    del hf["model.layers.0.mlp.experts.3.up_proj.weight"]
    with pytest.raises(ValueError, match="missing tensors .'model.layers.0.mlp.experts.3.up_proj.weight'"):
        M.hf_to_mcore_state(MOE, hf)
