"""Sharded safetensors I/O, bucketing, and the conversion tool's argument and input checks
(all fail before megatron would be imported)."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from megatron_s2lpo.config.model import ModelArch
from megatron_s2lpo.convert import mapping as M
from megatron_s2lpo.convert.export import bucketize
from megatron_s2lpo.convert.hf_io import INDEX_NAME, HFReader, HFShardWriter, copy_aux_files, parse_size

REPO_ROOT = Path(__file__).resolve().parents[2]
TOOL = REPO_ROOT / "tools" / "convert_checkpoint.py"
ARCH = ModelArch(family="qwen3", vocab_size=100, hidden_size=16, ffn_hidden_size=24, num_layers=2,
                 num_attention_heads=4, num_query_groups=2, head_dim=4, qk_layernorm=True)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def load_tool():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_hf_dir(path: Path, arch: ModelArch, drop: str = "", reshape: str = "") -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(arch.to_hf_config_dict()))
    tensors = {}
    for pm in M.param_maps(arch):
        for name, shape in zip(pm.hf_names, M.hf_shapes(pm, arch)):
            if name != drop:
                tensors[name] = torch.zeros((3, 3) if name == reshape else shape)
    save_file(tensors, str(path / "model.safetensors"))


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 5 * 10**8
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("1024") == 1024 and parse_size("1.5kb") == 1500
    with pytest.raises(ValueError, match="cannot read size"):
        parse_size("five")


def test_shard_writer_round_trip_and_index(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(10 * (i + 1), generator=gen) for i in range(6)}
    tensors["big"] = torch.randn(500, generator=gen)  # larger than a shard: alone
    tensors["half"] = torch.randn(7, 3, generator=gen).to(torch.bfloat16)
    writer = HFShardWriter(str(tmp_path), max_shard_bytes=400)
    view = torch.arange(20.0)
    writer.add("view", view[5:10])  # a view of a larger storage is written as its own tensor
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    with pytest.raises(ValueError, match="written twice"):
        writer.add("t0", tensors["t0"])
    files = writer.close()
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert sorted(set(index["weight_map"].values())) == files and len(files) > 2
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not list(tmp_path.glob("*.tmp"))
    assert index["metadata"]["total_size"] == sum(map(nbytes, tensors.values())) + 20
    for shard in files:
        names = [n for n, f in index["weight_map"].items() if f == shard]
        size = sum(nbytes(tensors[n]) if n in tensors else 20 for n in names)
        assert size <= 400 or len(names) == 1
    reader = HFReader(str(tmp_path))
    assert list(reader.names()) == ["view", *tensors]
    assert torch.equal(reader["view"], view[5:10])
    for name, tensor in tensors.items():
        assert reader[name].dtype == tensor.dtype and torch.equal(reader[name], tensor)
        assert reader.shape(name) == tuple(tensor.shape)
    assert reader.dtype() == torch.float32  # of the first tensor


def test_reader_single_file_and_errors(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    reader = HFReader(str(tmp_path))
    assert reader.names() == ["a"] and "a" in reader and torch.equal(reader["a"], torch.ones(2))
    with pytest.raises(KeyError, match="'b'"):
        reader["b"]
    with pytest.raises(FileNotFoundError, match="no model.safetensors.index.json"):
        HFReader(str(tmp_path / "missing"))


def test_copy_aux_files(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(), dst.mkdir()
    for name in ("config.json", "tokenizer.json", "generation_config.json", "notes.txt"):
        (src / name).write_text(name)
    assert sorted(copy_aux_files(str(src), str(dst))) == ["config.json", "generation_config.json",
                                                         "tokenizer.json"]
    assert (dst / "tokenizer.json").read_text() == "tokenizer.json" and not (dst / "notes.txt").exists()


def test_bucketize():
    items = [(f"t{i}", torch.zeros(n)) for i, n in enumerate([8, 8, 5, 10, 100, 1])]  # fp32: 4 B each
    buckets = list(bucketize(iter(items), bucket_bytes=80))
    assert [[n for n, _ in b] for b in buckets] == [["t0", "t1"], ["t2", "t3"], ["t4"], ["t5"]]
    assert [x for b in buckets for x in b] == items
    assert list(bucketize(iter([]), 10)) == []
    with pytest.raises(ValueError, match="bucket_bytes"):
        list(bucketize(iter(items), 0))


def test_help_documents_both_directions():
    out = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    assert "hf-to-mcore --hf /models/Qwen3-8B-Base --out /ckpt/qwen3-8b-tp4 --tp 4 --pp 1" in out
    assert "mcore-to-hf --mcore /ckpt/qwen3-8b-tp4" in out
    for direction, flag in (("hf-to-mcore", "--tp"), ("mcore-to-hf", "--hf-config")):
        text = subprocess.run([sys.executable, str(TOOL), direction, "--help"], capture_output=True,
                              text=True, timeout=60, check=True).stdout
        assert flag in text and "Example:" in text


def run_tool(capsys, *argv: str) -> tuple[int, str]:
    code = load_tool().main(list(argv))
    return code, capsys.readouterr().err


def test_tool_refuses_non_empty_output(tmp_path, capsys):
    write_hf_dir(tmp_path / "hf", ARCH)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    code, err = run_tool(capsys, "hf-to-mcore", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "out"))
    assert code == 2 and "is not empty; pass --force" in err


@pytest.mark.parametrize("case,match", [
    ("unsupported", r"MistralForCausalLM.*not supported"),
    ("missing", r"missing tensors \['model\.layers\.1\.mlp\.up_proj\.weight'\], unexpected tensors none"),
    ("shape", r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(3, 3\), expected \(8, 16\)"),
    ("tp", r"num_attention_heads \(4\) is not divisible by tensor parallel size 3"),
    ("pp", r"num_layers \(2\) must be divisible by pipeline parallel size 4"),
])
def test_tool_input_errors(tmp_path, capsys, case, match):
    hf = tmp_path / "hf"
    write_hf_dir(hf, ARCH, drop="model.layers.1.mlp.up_proj.weight" if case == "missing" else "",
                 reshape="model.layers.0.self_attn.k_proj.weight" if case == "shape" else "")
    if case == "unsupported":
        cfg = json.loads((hf / "config.json").read_text())
        cfg.update(architectures=["MistralForCausalLM"], model_type="mistral")
        (hf / "config.json").write_text(json.dumps(cfg))
    tp, pp = {"tp": ("3", "1"), "pp": ("1", "4")}.get(case, ("1", "1"))
    code, err = run_tool(capsys, "hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "out"),
                         "--tp", tp, "--pp", pp)
    assert code == 2
    assert re.search(match, err), err


def test_tool_mcore_to_hf_needs_a_checkpoint(tmp_path, capsys):
    write_hf_dir(tmp_path / "hf", ARCH)
    (tmp_path / "ckpt").mkdir()
    code, err = run_tool(capsys, "mcore-to-hf", "--mcore", str(tmp_path / "ckpt"), "--out",
                         str(tmp_path / "out"), "--hf-config", str(tmp_path / "hf"))
    assert code == 2 and "is not a megatron-core dist checkpoint" in err
