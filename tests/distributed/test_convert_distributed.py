"""HF <-> megatron conversion with real megatron-core: logits parity at TP=1/TP=2, streaming
export at TP=2 / PP=2 / PP=2 x VP=2 equal to the TP=1 export (= the HF tensors), and the tool's
dist checkpoints in both directions, bit-exact.

One module fixture pays for everything: the tool once per direction (single process) and one
2-process launch of `convert_worker.py` that runs all layouts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from megatron_s2lpo.config.model import ModelArch  # noqa: E402
from megatron_s2lpo.convert.hf_io import INDEX_NAME, HFReader  # noqa: E402
from tests.distributed.launch import parse_checks, run_distributed  # noqa: E402

pytestmark = pytest.mark.distributed

TOOL = REPO_ROOT / "tools" / "convert_checkpoint.py"
WORKER = Path(__file__).with_name("convert_worker.py")
CASES = {
    # untied, GQA (8 heads / 2 groups), qk-layernorm, vocab 300 padded to 384 (TP=1) / 512 (TP=2)
    "qwen3": ModelArch(family="qwen3", vocab_size=300, hidden_size=32, ffn_hidden_size=48, num_layers=4,
                       num_attention_heads=8, num_query_groups=2, head_dim=8, qk_layernorm=True),
    # tied embeddings, QKV bias, GQA 4 / 2, vocab 257
    "qwen2": ModelArch(family="qwen2", vocab_size=257, hidden_size=32, ffn_hidden_size=64, num_layers=2,
                       num_attention_heads=4, num_query_groups=2, head_dim=8, add_qkv_bias=True,
                       tie_word_embeddings=True, rope_theta=10000.0),
    # untied, GQA 4 / 2, head_dim 8 != hidden / heads
    "llama": ModelArch(family="llama", vocab_size=200, hidden_size=48, ffn_hidden_size=56, num_layers=2,
                       num_attention_heads=4, num_query_groups=2, head_dim=8, rope_theta=500000.0),
}
LAYOUT_CASES = {"tp1": list(CASES), "tp2": list(CASES), "pp2": list(CASES), "pp2vp2": ["qwen3"]}
EXPECTED_CHECKS = (
    [f"{layout}/{case}/export" for layout, cases in LAYOUT_CASES.items() for case in cases]
    + [f"{layout}/{case}/logits" for layout in ("tp1", "tp2") for case in CASES]
    + ["tp2/qwen2/save", "pp2/llama/save", "pp2/qwen2/save", "pp2/qwen2/load_tied", "tp2/qwen2/bf16_round_trip", "tp2/checkpoint_errors", "tp2/llama/mcore_to_hf_2ranks"]
    + [f"{layout}/qwen3/{what}" for layout in ("tp2", "pp2")
       for what in ("load_tool_checkpoint", "learner_loads_tool_checkpoint")]
)


def make_hf_model(arch: ModelArch, out_dir: Path, seed: int, dtype: torch.dtype = torch.float32) -> None:
    """A tiny HF model with random weights everywhere (norms around 1, biases non-zero)."""
    import transformers

    config = transformers.AutoConfig.for_model(**arch.to_hf_config_dict())
    model = transformers.AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1 + 0.1 * noise if "norm" in name else 0.05 * noise)
    model.to(dtype).save_pretrained(out_dir)
    (out_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))


def run_tool(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT)
    assert proc.returncode == 0, f"tool failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("convert")
    for seed, (case, arch) in enumerate(CASES.items()):
        make_hf_model(arch, work / f"hf_{case}", seed)
    bf16 = work / "bf16_qwen2"  # not a case dir (no hf_ prefix): the worker's bf16 round trip
    make_hf_model(CASES["qwen2"], bf16, seed=7, dtype=torch.bfloat16)
    run_tool("hf-to-mcore", "--hf", str(work / "hf_qwen3"), "--out", str(work / "mcore_tool_qwen3"),
             "--tp", "2", "--pp", "2")
    outputs = run_distributed(WORKER, nprocs=2, timeout=300, args=(str(work),))
    back = work / "hf_back_qwen2"
    run_tool("mcore-to-hf", "--mcore", str(work / "mcore_tp2_qwen2"), "--out", str(back),
             "--hf-config", str(work / "hf_qwen2"), "--max-shard-size", "20KB")
    return {"dir": work, "checks": [parse_checks(out) for out in outputs]}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", EXPECTED_CHECKS)
def test_worker_check(work, name):
    for rank, checks in enumerate(work["checks"]):
        assert name in checks, f"rank {rank} did not run check {name}"
        record = checks[name]
        assert record["ok"], f"rank {rank}: {record.get('error')}\n{record.get('trace', '')}"


@pytest.mark.timeout(600)
def test_tool_round_trip_is_bit_exact(work):
    src, back = work["dir"] / "hf_qwen2", work["dir"] / "hf_back_qwen2"
    a, b = HFReader(str(src)), HFReader(str(back))
    assert sorted(b.names()) == sorted(a.names())
    for name in a.names():
        assert torch.equal(b[name], a[name]), name
    index = json.loads((back / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((back / f).is_file() for f in shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in map(a.get, a.names()))
    for shard in shards:  # at most --max-shard-size of tensor bytes, unless one tensor alone
        names = [n for n, f in index["weight_map"].items() if f == shard]
        nbytes = sum(a[n].numel() * a[n].element_size() for n in names)
        assert nbytes <= 20_000 or len(names) == 1, (shard, nbytes)
    for aux in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert (back / aux).read_bytes() == (src / aux).read_bytes(), aux


@pytest.mark.timeout(600)
def test_tool_output_loads_in_transformers(work):
    import transformers

    ids = torch.randint(0, 257, (2, 6), generator=torch.Generator().manual_seed(0))
    logits = []
    for d in ("hf_qwen2", "hf_back_qwen2"):
        model = transformers.AutoModelForCausalLM.from_pretrained(work["dir"] / d).eval()
        with torch.no_grad():
            logits.append(model(ids).logits)
    assert torch.equal(logits[0], logits[1])


@pytest.mark.timeout(600)
def test_tool_checkpoint_layout(work):
    # a weights-only learner checkpoint root (learner/checkpoint.py) plus convert_info.json
    root = work["dir"] / "mcore_tool_qwen3"
    assert (root / "latest").read_text().strip() == "step_00000000"
    step = root / "step_00000000"
    for name in ("dist/metadata.json", "dist/.metadata", "dist/common.pt", "COMPLETE", "trainer_state.json"):
        assert (step / name).is_file(), name
    assert not (step / "rng").exists()  # the conversion's RNG must not seed a training run
    assert json.loads((step / "dist" / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    info = json.loads((root / "convert_info.json").read_text())
    assert info["target_tensor_parallel_size"] == 2 and info["target_pipeline_parallel_size"] == 2
    assert info["arch"]["family"] == "qwen3" and info["dtype"] == "float32"
