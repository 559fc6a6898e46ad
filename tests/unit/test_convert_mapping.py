"""Pure HF <-> megatron maps (no megatron import): layouts against loop references, TP split and
merge, bit-exact round trips at TP=1/2/4, clear errors."""

import subprocess
import sys

import pytest
import torch

from megatron_s2lpo.config.model import ModelArch
from megatron_s2lpo.convert import mapping as M

QWEN3 = ModelArch(family="qwen3", vocab_size=300, hidden_size=32, ffn_hidden_size=48, num_layers=2,
                  num_attention_heads=8, num_query_groups=2, head_dim=8, qk_layernorm=True)
QWEN2_TIED = ModelArch(family="qwen2", vocab_size=257, hidden_size=32, ffn_hidden_size=64,
                       num_layers=3, num_attention_heads=4, num_query_groups=4, head_dim=8,
                       add_qkv_bias=True, tie_word_embeddings=True)
LLAMA = ModelArch(family="llama", vocab_size=128, hidden_size=24, ffn_hidden_size=40, num_layers=2,
                  num_attention_heads=4, num_query_groups=1, head_dim=6, tie_word_embeddings=True)
ARCHS = [QWEN3, QWEN2_TIED, LLAMA]


def random_hf_state(arch: ModelArch, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen)
            for pm in M.param_maps(arch) for name, shape in zip(pm.hf_names, M.hf_shapes(pm, arch))}


def hf_model_state(arch: ModelArch) -> dict[str, torch.Tensor]:
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.for_model(**arch.to_hf_config_dict())
    model = transformers.AutoModelForCausalLM.from_config(config)
    return model.state_dict()


def ref_qkv(arch: ModelArch, q, k, v) -> torch.Tensor:
    """Megatron's fused layout written as loops: per group, its q heads then its k then its v."""
    hd, per_group = arch.head_dim, arch.num_attention_heads // arch.num_query_groups
    rows = []
    for g in range(arch.num_query_groups):
        for j in range(per_group):
            head = g * per_group + j
            rows += [q[head * hd + d] for d in range(hd)]
        rows += [k[g * hd + d] for d in range(hd)]
        rows += [v[g * hd + d] for d in range(hd)]
    return torch.stack(rows)


def test_pure_maps_do_not_import_megatron():
    code = ("import sys, megatron_s2lpo.convert.mapping, megatron_s2lpo.convert.hf_io, "
            "megatron_s2lpo.convert.export; assert 'megatron' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.family)
def test_names_match_transformers_models(arch):
    # the HF names we map are exactly those of the transformers model (tied: lm_head is the copy)
    state = hf_model_state(arch)
    M.check_hf_names(arch, list(state))
    expected = set(state) - ({"lm_head.weight"} if arch.tie_word_embeddings else set())
    assert set(M.hf_names(arch)) == expected
    for pm in M.param_maps(arch):
        for name, shape in zip(pm.hf_names, M.hf_shapes(pm, arch)):
            assert tuple(state[name].shape) == shape, name


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.family)
def test_qkv_layout_matches_loop_reference(arch):
    hf = random_hf_state(arch)
    for pm in M.param_maps(arch):
        if pm.fuse == M.QKV:
            tensors = [hf[n] for n in pm.hf_names]
            fused = M.hf_to_mcore(pm, arch, tensors, 0)
            assert torch.equal(fused, ref_qkv(arch, *tensors))


@pytest.mark.parametrize("tp", [1, 2])
def test_qkv_semantics_like_megatron_attention(tp):
    # Emulate megatron's get_query_key_value_tensors on each TP rank's shard and compare the
    # heads with HF's q/k/v projections after repeat_kv.
    arch = QWEN3  # 8 heads, 2 groups: 4 q heads per group
    hf = random_hf_state(arch)
    pm = next(p for p in M.param_maps(arch) if p.mcore_name.endswith("linear_qkv.weight"))
    wq, wk, wv = (hf[n] for n in pm.hf_names)
    x = torch.randn(5, arch.hidden_size)
    hd, ng, nh = arch.head_dim, arch.num_query_groups, arch.num_attention_heads
    q_hf = (x @ wq.T).view(5, nh, hd)
    k_hf = (x @ wk.T).view(5, ng, hd).repeat_interleave(nh // ng, dim=1)  # repeat_kv
    v_hf = (x @ wv.T).view(5, ng, hd).repeat_interleave(nh // ng, dim=1)
    full = M.hf_to_mcore(pm, arch, [wq, wk, wv], 0)
    for rank, shard in enumerate(M.split_tp(pm, full, tp)):
        ng_r, nh_r = ng // tp, nh // tp
        mixed = (x @ shard.T).view(5, ng_r, (nh_r // ng_r + 2) * hd)
        q, k, v = mixed.split([nh_r // ng_r * hd, hd, hd], dim=2)
        q = q.reshape(5, nh_r, hd)
        k = k.repeat_interleave(nh_r // ng_r, dim=1)
        v = v.repeat_interleave(nh_r // ng_r, dim=1)
        heads = slice(rank * nh_r, (rank + 1) * nh_r)
        torch.testing.assert_close(q, q_hf[:, heads], rtol=0, atol=1e-5)
        torch.testing.assert_close(k, k_hf[:, heads], rtol=0, atol=1e-5)
        torch.testing.assert_close(v, v_hf[:, heads], rtol=0, atol=1e-5)


def test_fc1_split_keeps_gate_and_up_per_rank():
    arch = QWEN3
    pm = next(p for p in M.param_maps(arch) if p.fuse == M.GATE_UP)
    gate = torch.arange(48 * 32, dtype=torch.float32).view(48, 32)
    up = -gate
    full = M.hf_to_mcore(pm, arch, [gate, up], 0)
    assert torch.equal(full, torch.cat([gate, up]))
    for tp in (2, 4):
        shards = M.split_tp(pm, full, tp)
        rows = 48 // tp
        for r, shard in enumerate(shards):
            assert torch.equal(shard, torch.cat([gate[r * rows:(r + 1) * rows], up[r * rows:(r + 1) * rows]]))
        assert torch.equal(M.merge_tp(pm, shards), full)


def test_row_column_and_replicated_splits():
    arch = QWEN3
    maps = {pm.mcore_name.split(".", 3)[-1]: pm for pm in M.layer_param_maps(arch, 0)}
    proj = maps["self_attention.linear_proj.weight"]
    full = torch.randn(32, 64)
    assert [s.shape for s in M.split_tp(proj, full, 4)] == [(32, 16)] * 4
    assert torch.equal(M.split_tp(proj, full, 4)[1], full[:, 16:32])
    norm = maps["self_attention.q_layernorm.weight"]
    assert all(torch.equal(s, torch.ones(8)) for s in M.split_tp(norm, torch.ones(8), 2))
    fc2 = maps["mlp.linear_fc2.weight"]
    assert fc2.tp_split == M.ROW and maps["self_attention.linear_qkv.weight"].tp_split == M.COLUMN


def test_vocab_padding_is_zero_and_sliced_back():
    arch = QWEN3  # vocab 300 -> 384 at TP=1, 512 at TP=4
    assert arch.padded_vocab_size(1) == 384 and arch.padded_vocab_size(4) == 512
    hf = random_hf_state(arch)
    state = M.hf_to_mcore_state(arch, hf, tp_size=4, tp_rank=3)
    emb = state["embedding.word_embeddings.weight"]
    assert emb.shape == (128, 32) and torch.equal(emb, torch.zeros(128, 32))  # rows 384..511: padding
    state0 = M.hf_to_mcore_state(arch, hf, tp_size=4, tp_rank=0)
    assert torch.equal(state0["output_layer.weight"], hf["lm_head.weight"][:128])


@pytest.mark.parametrize("naming", M.NAMINGS)
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.family)
def test_round_trip_is_bit_exact(arch, tp, naming):
    if arch.num_attention_heads % tp:
        pytest.skip("heads not divisible")
    hf = random_hf_state(arch, seed=tp)
    states = [M.hf_to_mcore_state(arch, hf, tp_size=tp, tp_rank=r, naming=naming) for r in range(tp)]
    assert M.detect_naming(list(states[0])) == naming
    for name, tensor in states[0].items():
        pm = next(p for p in M.param_maps(arch, naming) if p.mcore_name == name)
        full_shape = M.mcore_shape(pm, arch, arch.padded_vocab_size(tp))
        dim = {M.COLUMN: 0, M.GATE_UP: 0, M.ROW: 1}.get(pm.tp_split)
        expected = list(full_shape)
        if dim is not None:
            expected[dim] //= tp
        assert tuple(tensor.shape) == tuple(expected), name
    back = M.mcore_to_hf_state(arch, states)
    assert list(back) == M.hf_names(arch)
    for name in hf:
        assert torch.equal(back[name], hf[name]), name


@pytest.mark.parametrize("tp", [2, 4])
def test_fewer_query_groups_than_tp_ranks(tp):
    # LLAMA has a single query group: each rank gets a contiguous slice of [q1..q4 k v]
    arch = LLAMA
    hf = random_hf_state(arch)
    states = [M.hf_to_mcore_state(arch, hf, tp_size=tp, tp_rank=r) for r in range(tp)]
    full = torch.cat([hf[n] for n in ("model.layers.0.self_attn.q_proj.weight",
                                       "model.layers.0.self_attn.k_proj.weight",
                                       "model.layers.0.self_attn.v_proj.weight")])
    qkv = [s["decoder.layers.0.self_attention.linear_qkv.weight"] for s in states]
    assert torch.equal(torch.cat(qkv), full)


def test_layer_renumbering_and_naming_conversion():
    assert M.local_to_global_name("decoder.layers.1.mlp.linear_fc1.weight", 4) == \
        "decoder.layers.5.mlp.linear_fc1.weight"
    assert M.global_to_local_name("decoder.layers.5.mlp.linear_fc1.weight", 4) == \
        "decoder.layers.1.mlp.linear_fc1.weight"
    assert M.local_to_global_name("decoder.final_layernorm.weight", 4) == "decoder.final_layernorm.weight"
    assert M.layer_of("decoder.layers.12.self_attention.linear_qkv.weight") == 12
    assert M.layer_of("embedding.word_embeddings.weight") is None
    local = M.param_maps(QWEN3, "local")
    te = M.param_maps(QWEN3, "te")
    assert [M.convert_naming(p.mcore_name, "te") for p in local] == [p.mcore_name for p in te]
    assert [M.convert_naming(p.mcore_name, "local") for p in te] == [p.mcore_name for p in local]
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in {p.mcore_name for p in te}
    assert "decoder.layers.1.pre_mlp_layernorm.weight" in {p.mcore_name for p in local}


def test_global_order_and_tied_embeddings():
    names = [pm.mcore_name for pm in M.param_maps(QWEN2_TIED)]
    assert names[0] == "embedding.word_embeddings.weight"
    assert names[-1] == "decoder.final_layernorm.weight"  # tied: no output_layer
    assert "decoder.layers.0.self_attention.linear_qkv.bias" in names
    layers = [M.layer_of(n) for n in names[1:-1]]
    assert layers == sorted(layers) and set(layers) == {0, 1, 2}
    assert M.param_maps(QWEN3)[-1].mcore_name == "output_layer.weight"


def test_shape_mismatch_names_tensor_and_shapes():
    hf = random_hf_state(QWEN3)
    hf["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(8, 32)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*\(8, 32\).*\(16, 32\)"):
        M.hf_to_mcore_state(QWEN3, hf)


def test_missing_and_unexpected_tensors():
    hf = random_hf_state(QWEN3)
    del hf["model.layers.0.mlp.up_proj.weight"]
    hf["model.layers.0.mlp.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing tensors \['model\.layers\.0\.mlp\.up_proj\.weight'\]"
                                         r".*unexpected tensors \['model\.layers\.0\.mlp\.extra\.weight'\]"):
        M.hf_to_mcore_state(QWEN3, hf)
    # tied checkpoints may carry the lm_head copy; old ones the RoPE cache
    tied = random_hf_state(QWEN2_TIED)
    tied["lm_head.weight"] = tied["model.embed_tokens.weight"]
    tied["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(4)
    M.check_hf_names(QWEN2_TIED, list(tied))
    with pytest.raises(ValueError, match="missing on TP ranks"):
        M.mcore_to_hf_state(QWEN3, [{}])


def test_unsupported_architectures_and_parallel_sizes():
    with pytest.raises(ValueError, match="o_proj bias"):
        M.param_maps(ModelArch(family="llama", vocab_size=8, hidden_size=8, ffn_hidden_size=8,
                               num_layers=1, num_attention_heads=2, num_query_groups=2, head_dim=4,
                               add_qkv_bias=True))
    with pytest.raises(ValueError, match="num_attention_heads"):
        M.check_tp_size(QWEN2_TIED, 8)
    with pytest.raises(ValueError, match="num_query_groups"):
        M.check_tp_size(ModelArch(family="qwen3", vocab_size=8, hidden_size=8, ffn_hidden_size=12,
                                  num_layers=1, num_attention_heads=6, num_query_groups=3,
                                  head_dim=4), 2)
    with pytest.raises(ValueError, match="num_layers"):
        M.check_pp_size(QWEN2_TIED, 2)
    with pytest.raises(ValueError, match="naming"):
        M.layer_param_maps(QWEN3, 0, "nemo")
