"""FP8 weight sync into a real SGLang 0.5.23 server started with `--quantization fp8` on this CPU.

What the real CPU server does with a block-FP8 checkpoint (measured): it loads it ("Detected fp8
checkpoint", "Load weight end ... quant=fp8, fmt=e4m3": its own loader builds the float8 weights
and `weight_scale_inv` block scales), accepts weight updates into them, and reads them back
(`/get_weights_by_name`); it cannot compute with them: the first forward runs
`Fp8LinearMethod.apply` -> `triton_w8a8_block_fp8_linear` -> `per_token_group_quant_fp8`, a
Triton kernel, and Triton finds no driver ("RuntimeError: 0 active drivers ([]). There should
only be one."), which ends the scheduler. So the server is started with `--skip-server-warmup`
(its warm-up request is such a forward) and with SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=false
(otherwise its /health generates a token), every transport pushes quantized weights into it, and
the weights it holds are read back and compared, exactly, with what was pushed; the last test
asks it to generate and finds that error in its log. The model is a tiny Llama (SGLang 0.5.23
implements `get_weights_by_name` for Llama, not yet for Qwen: "TODO: Add support for Qwen models")
whose fused q/k/v and gate/up shards are whole 128-row blocks, as SGLang's block FP8 requires.
"""

from __future__ import annotations

import json
import os
import urllib.request

import pytest
import torch

from megatron_s2lpo.config.model import ModelArch
from megatron_s2lpo.config.sync import SyncConfig
from megatron_s2lpo.convert.fp8 import Fp8Format, write_fp8_dir
from megatron_s2lpo.rollout import GenerateRequest, LocalEngine, SGLangEngine
from megatron_s2lpo.sync.base import TransportContext
from megatron_s2lpo.sync.disk import DiskTransport
from megatron_s2lpo.sync.exporter import QuantizingExporter, StateDictExporter
from megatron_s2lpo.sync.transports import DistributedTransport, TensorTransport
from megatron_s2lpo.sync.weight_sync import verify_version

from conftest import real_engine_config

pytestmark = pytest.mark.slow
FMT = Fp8Format()
HEALTH_GENERATION_ENV = "SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION"  # sglang/srt/environ.py, default true
# hidden / heads = head_dim: SGLang's Llama get_weights_by_name slices q/k/v with that head size
ARCH = dict(family="llama", hidden_size=256, ffn_hidden_size=256, num_layers=2, num_attention_heads=2,
            num_query_groups=1, head_dim=128, max_position_embeddings=256)
READ = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.o_proj.weight",
        "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight")
SCALES = ("model.layers.1.self_attn.o_proj.weight_scale_inv", "model.layers.1.mlp.down_proj.weight_scale_inv")


@pytest.fixture(scope="module")
def fp8_model(tmp_path_factory, tok):
    arch = ModelArch(vocab_size=len(tok), **ARCH)
    root = tmp_path_factory.mktemp("fp8-llama")
    engine = LocalEngine.from_arch(arch, tokenizer=tok, init_seed=3)
    engine.save_pretrained(str(root / "bf16"))
    write_fp8_dir(str(root / "bf16"), str(root / "fp8"), FMT)
    weights = {n: p.detach().clone() for n, p in engine.model.state_dict().items() if "rotary" not in n}
    return str(root / "fp8"), arch, weights


@pytest.fixture(scope="module")
def fp8_server(sglang_env, fp8_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("fp8-server-logs")
    cfg = real_engine_config(fp8_model[0], max_restarts=0, max_retries=0,
                             extra_args=["--quantization", "fp8", "--dtype", "bfloat16", "--skip-server-warmup"])
    # SGLang 0.5.23 answers GET /health (what the engine polls until the server is up) by generating
    # one token once the server is up, the same forward: its environment switch turns that off.
    saved = os.environ.get(HEALTH_GENERATION_ENV)
    os.environ[HEALTH_GENERATION_ENV] = "false"
    try:
        engine = SGLangEngine(cfg, name="learner", log_dir=str(logs), seed=0)
    finally:
        if saved is None:
            os.environ.pop(HEALTH_GENERATION_ENV, None)
        else:
            os.environ[HEALTH_GENERATION_ENV] = saved
    yield engine, logs
    engine.close()


def served(url: str, name: str) -> torch.Tensor:
    """What the real server holds under HF name `name` (SGLang's /get_weights_by_name, float32)."""
    req = urllib.request.Request(url + "/get_weights_by_name", data=json.dumps({"name": name, "truncate_size": 4096})
                                 .encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return torch.tensor(json.loads(resp.read()), dtype=torch.float32)


def expected(weights: dict, name: str) -> torch.Tensor:
    """The tensor the server should hold for `name` after a push of `weights`: our quantized one."""
    pushed = dict(FMT.quantize_named(weights.items()))
    if name in pushed and pushed[name].dtype == torch.float8_e4m3fn or name.endswith("_scale_inv"):
        return pushed[name].float()
    return weights[name].to(torch.bfloat16).float()  # unquantized: at the server's --dtype bfloat16


def assert_holds(url: str, weights: dict, names: tuple[str, ...] = READ) -> None:
    for name in names:
        assert torch.equal(served(url, name), expected(weights, name)), name


def test_the_real_server_loads_the_fp8_checkpoint(fp8_server, fp8_model):
    engine, _ = fp8_server
    assert_holds(engine.url, fp8_model[2])


@pytest.mark.xfail(strict=True, reason="measured after the merge: /get_weights_by_name answers the block scales of "
                   "this Llama with the float32-min fill of SGLang's BlockQuantScaleParameter, while the contract "
                   "tier's FP8 Qwen3 serves our scales (tests/contract/test_sglang_fp8.py); not yet explained")
def test_the_real_server_reports_the_block_scales_it_loaded(fp8_server, fp8_model):
    engine, _ = fp8_server
    assert_holds(engine.url, fp8_model[2], SCALES)


def perturbed(weights: dict, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {n: t + 0.02 * torch.randn(t.shape, generator=gen) for n, t in weights.items()}


@pytest.mark.parametrize("transport", ["disk", "distributed", "tensor"])
def test_every_transport_pushes_fp8_weights_into_the_real_server(fp8_server, fp8_model, tmp_path, transport):
    engine, _ = fp8_server
    _, arch, weights = fp8_model
    version = {"disk": 1, "distributed": 2, "tensor": 3}[transport]
    new = perturbed(weights, version)
    context = TransportContext(arch=arch, quantization=FMT)
    buckets = QuantizingExporter(StateDictExporter(new, 1 << 18), FMT)
    if transport == "disk":
        sender = DiskTransport(engine, SyncConfig(disk_dir=str(tmp_path)), context)
    elif transport == "distributed":
        sender = DistributedTransport(engine, SyncConfig(master_address="127.0.0.1", group_backend="gloo",
                                                         group_timeout_s=60), context)
    else:  # CPU tensors as shared-memory files: the one strategy the real server takes (test_sync_real.py)
        sender = TensorTransport(engine, SyncConfig(), context, check_environment=False, cpu_sharing="file_system")
    try:
        with engine.paused():
            sender.push(buckets.flat_buckets() if transport == "disk" else buckets.buckets(), version)
            verify_version(engine, version)
    finally:
        sender.close()
    assert_holds(engine.url, new)


def test_the_real_cpu_server_cannot_compute_with_fp8_weights(fp8_server, tok):
    """Last: the server's scheduler dies on its first forward, with Triton's own error."""
    engine, logs = fp8_server
    with pytest.raises(Exception):
        engine.generate([GenerateRequest(request_id="fp8-forward", prompt_ids=tok.encode("1+2="), max_new_tokens=2)])
    log = "\n".join(p.read_text(errors="replace") for p in logs.iterdir())
    assert "triton_w8a8_block_fp8_linear" in log and "0 active drivers ([]). There should only be one." in log
