"""Block-FP8 weights (convert/fp8.py): the quantizer against a slow reference, the error bound,
which tensors are quantized, and quantized syncs into the in-process engine.

SGLang's own loader (its Qwen3 model with `Fp8Config`, `BlockQuantScaleParameter` weight
loaders and `block_quant_dequant`) judges the same tensors in tests/contract/test_sglang_fp8.py.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch

from megatron_s2lpo.config.model import ModelArch
from megatron_s2lpo.config.sync import SyncConfig
from megatron_s2lpo.convert.fp8 import (FP8_DTYPE, Fp8Format, block_dequantize, block_quantize, error_bound,
                                        write_fp8_dir)
from megatron_s2lpo.rollout.local import LocalEngine
from megatron_s2lpo.sync.exporter import StateDictExporter
from megatron_s2lpo.sync.weight_sync import WeightSync

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = ModelArch(family="qwen3", vocab_size=96, hidden_size=64, ffn_hidden_size=160, num_layers=2,
                 num_attention_heads=4, num_query_groups=2, head_dim=16, qk_layernorm=True, rope_theta=10000.0)
ONE_RANK = SimpleNamespace(rank=0, world_size=1, dp_rank=0)


def reference_block_quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """slime's `_blockwise_cast_to_fp8_triton` (slime/utils/fp8_kernel.py, force_pow_2_scale off),
    one block at a time in float32."""
    n, k = w.shape
    nb, kb = -(-n // block[0]), -(-k // block[1])
    q = torch.empty(n, k, dtype=FP8_DTYPE)
    scales = torch.empty(nb, kb, dtype=torch.float32)
    for i in range(nb):
        for j in range(kb):
            rows, cols = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            x = w[rows, cols].float()
            absmax = max(float(x.abs().max()), 1e-10)
            if absmax == float("inf") or absmax != absmax:
                s = torch.tensor(1.0)
            else:
                s = torch.tensor(absmax, dtype=torch.float32) / 448.0
            q[rows, cols] = (x * (1.0 / s)).clamp(-448.0, 448.0).to(FP8_DTYPE)
            scales[i, j] = s
    return q, scales


def awkward_weight(seed: int, shape=(300, 260)) -> torch.Tensor:
    """Partial blocks, an all-zero block, a block 100x larger, values in e4m3's subnormal range."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.02
    w[:128, :128] *= 100
    w[128:256, 128:256] = 0
    w[256:, :7] = torch.randn(shape[0] - 256, 7, generator=gen) * 1e-7
    return w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [(128, 128), (64, 32)])
def test_block_quantize_equals_the_reference_quantizer(dtype, block):
    w = awkward_weight(0).to(dtype)
    q, scales = block_quantize(w, block)
    ref_q, ref_scales = reference_block_quantize(w, block)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape and scales.dtype == torch.float32
    assert scales.shape == (-(-300 // block[0]), -(-260 // block[1]))
    assert torch.equal(scales, ref_scales)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))  # bit for bit


def test_dequantized_weights_stay_within_the_e4m3_bound():
    for seed in range(3):
        w = awkward_weight(seed)
        q, scales = block_quantize(w)
        err = (w - block_dequantize(q, scales)).abs()
        bound = error_bound(w, scales)
        assert bool((err <= bound).all()), float((err / bound).max())
        assert float((err / bound).max()) > 0.5  # the bound is tight: a looser one would not fail this
    # a bound of half the size (2^-5 relative) fails: the check can fail
    w = awkward_weight(0)
    q, scales = block_quantize(w)
    assert bool(((w - block_dequantize(q, scales)).abs() > error_bound(w, scales) / 2).any())


def test_which_tensors_are_quantized():
    fmt = Fp8Format(ignored=("model.layers.1.mlp", "mlp.gate"))
    w = torch.zeros(4, 4)
    yes = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight",
           "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.down_proj.weight",
           "model.layers.3.mlp.experts.5.up_proj.weight"]
    no = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.0.mlp.gate.weight",
          "model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.q_norm.weight"]
    assert all(fmt.quantizes(n, w) for n in yes), [n for n in yes if not fmt.quantizes(n, w)]
    assert not any(fmt.quantizes(n, w) for n in no), [n for n in no if fmt.quantizes(n, w)]
    assert not fmt.quantizes("model.layers.0.self_attn.q_proj.bias", torch.zeros(4))  # Qwen2 biases stay
    out = dict(fmt.quantize_named([("model.layers.0.self_attn.q_proj.weight", torch.randn(200, 130)),
                                   ("model.norm.weight", torch.ones(4))]))
    assert out["model.layers.0.self_attn.q_proj.weight"].dtype == FP8_DTYPE
    assert out["model.layers.0.self_attn.q_proj.weight_scale_inv"].shape == (2, 2)
    assert out["model.norm.weight"].dtype == torch.float32
    assert Fp8Format().quantization_config() == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                                 "weight_block_size": [128, 128]}


def test_quantization_configs_that_are_not_block_fp8_are_refused():
    assert Fp8Format.from_quantization_config({"quant_method": "fp8", "weight_block_size": [128, 64],
                                               "modules_to_not_convert": ["lm_head"]}) == \
        Fp8Format(block=(128, 64), ignored=("lm_head",))
    for bad, words in (({"quant_method": "awq"}, "quant_method is 'awq'"),
                       ({"quant_method": "fp8"}, "no weight_block_size"),
                       ({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]},
                        "dynamic"),
                       ({"quant_method": "fp8", "weight_block_size": [128]}, "two positive integers")):
        with pytest.raises(ValueError, match=words):
            Fp8Format.from_quantization_config(bad)


def model_state(seed: int) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in LocalEngine.from_arch(ARCH, init_seed=seed).model.state_dict().items()}


def expected_engine_weights(state: dict, fmt: Fp8Format) -> dict[str, torch.Tensor]:
    return dict(fmt.dequantize_named(fmt.quantize_named(state.items())))


def fp8_engine(tmp_path, seed: int = 2) -> LocalEngine:
    src, dst = str(tmp_path / "bf16"), str(tmp_path / "fp8")
    LocalEngine.from_arch(ARCH, init_seed=seed).save_pretrained(src)
    write_fp8_dir(src, dst)
    return LocalEngine.from_pretrained(dst)


def test_an_fp8_checkpoint_makes_an_fp8_in_process_engine(tmp_path):
    engine = fp8_engine(tmp_path)
    with open(tmp_path / "fp8" / "config.json") as f:
        assert json.load(f)["quantization_config"]["weight_block_size"] == [128, 128]
    assert engine.fp8 == Fp8Format()
    want = expected_engine_weights(model_state(2), Fp8Format())
    theirs = engine.model.state_dict()
    assert all(torch.equal(theirs[n], t) for n, t in want.items() if n in theirs)
    assert not torch.equal(theirs["model.layers.0.mlp.up_proj.weight"], model_state(2)["model.layers.0.mlp.up_proj.weight"])
    with pytest.raises(FileExistsError):
        write_fp8_dir(str(tmp_path / "bf16"), str(tmp_path / "fp8"))
    with pytest.raises(ValueError, match="already has a quantization_config"):
        write_fp8_dir(str(tmp_path / "fp8"), str(tmp_path / "fp8-again"))


@pytest.mark.parametrize("transport", [None, "disk"])  # in-process buckets, and files on disk
def test_quantized_sync_into_an_fp8_engine(tmp_path, transport):
    engine = fp8_engine(tmp_path)
    state = model_state(1)
    fmt = Fp8Format()
    cfg = SyncConfig(parity_every=0, disk_dir=str(tmp_path / "sync"))
    sync = WeightSync(None, ONE_RANK, ARCH, engine, cfg, transport=transport, quantization=fmt,
                      exporter=StateDictExporter(state, 1 << 16))
    result = sync.sync(1)
    theirs = engine.model.state_dict()
    for name, tensor in expected_engine_weights(state, fmt).items():
        assert torch.equal(theirs[name], tensor), name
    full = sum(t.numel() * t.element_size() for t in state.values())
    assert result.num_bytes < 0.75 * full  # projections at one byte (+ scales); embeddings and norms fp32
    if transport == "disk":
        with open(os.path.join(result.path, "config.json")) as f:
            assert json.load(f)["quantization_config"] == fmt.quantization_config()
        assert LocalEngine.from_pretrained(result.path).fp8 == fmt


def test_an_unquantized_engine_refuses_float8_weights():
    engine = LocalEngine.from_arch(ARCH, init_seed=0)
    pushed = Fp8Format().quantize_named([("model.layers.0.mlp.up_proj.weight", torch.randn(160, 64))])
    with pytest.raises(ValueError, match="float8_e4m3fn.*block-FP8 checkpoint"):
        engine.update_weights_from_tensors(pushed[:1], version=1)
    fp8 = LocalEngine(LocalEngine.from_arch(ARCH, init_seed=0).model, fp8=Fp8Format())
    with pytest.raises(ValueError, match="weight_scale_inv is missing"):
        fp8.update_weights_from_tensors(pushed[:1], version=1)


def test_s2lpo_convert_hf_to_fp8(tmp_path, capsys):
    from megatron_s2lpo.cli import main

    src = str(tmp_path / "bf16")
    LocalEngine.from_arch(ARCH, init_seed=5).save_pretrained(src)
    out = str(tmp_path / "fp8")
    assert main(["convert", "hf-to-fp8", "--hf", src, "--out", out, "--ignore", "model.layers.1.mlp"]) == 0
    assert "wrote" in capsys.readouterr().out
    fmt = Fp8Format.from_model_dir(out)
    assert fmt == Fp8Format(ignored=("model.layers.1.mlp",))
    from megatron_s2lpo.convert.hf_io import HFReader

    reader = HFReader(out)
    assert reader.get("model.layers.0.mlp.up_proj.weight").dtype == FP8_DTYPE
    assert reader.get("model.layers.1.mlp.up_proj.weight").dtype == torch.float32  # ignored module
    assert "model.layers.1.mlp.up_proj.weight_scale_inv" not in reader
    assert main(["convert", "hf-to-fp8", "--hf", src, "--out", out]) == 2  # never overwrites
    assert "exists" in capsys.readouterr().err


def test_an_fp8_learner_engine_needs_a_parity_threshold_above_fp8_rounding():
    from megatron_s2lpo.config import load_config

    recipe = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "tiny_cpu.yaml")
    fp8 = "rollout.learner.extra_args=[--quantization, fp8]"
    with pytest.raises(ValueError, match="sync.parity_threshold=0.001 would fail every parity check"):
        load_config(recipe, [fp8])
    assert load_config(recipe, [fp8, "sync.parity_threshold=0.05"])
    assert load_config(recipe, [fp8, "sync.parity_every=0"])
