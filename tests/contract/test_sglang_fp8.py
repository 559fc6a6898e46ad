"""FP8 weight sync judged by SGLang 0.5.23's own FP8 loading code (a `--quantization fp8` server).

One contract-mode replica starts from a block-FP8 checkpoint written by `convert.fp8.write_fp8_dir`
with `--quantization fp8 --dtype bfloat16`. SGLang's cold-start loader builds its Qwen3 model with
`Fp8Config` (float8 weights + float32 `weight_scale_inv` block scales per linear layer) and loads
the checkpoint; every push (disk, tensor, distributed) then runs through SGLang's `WeightUpdater`
into that model, and the replica samples with the weights SGLang holds, dequantized by SGLang's
`block_quant_dequant` (tests/contract/sglang_fp8.py). So a name, shape, dtype or scale layout that
SGLang's loader reads differently than we write shows as an error or as a log-prob gap.
"""

from __future__ import annotations

import re
import sys

import pytest
import torch

from megatron_s2lpo.config.model import ModelArch
from megatron_s2lpo.config.rollout import EngineConfig
from megatron_s2lpo.config.sync import SyncConfig
from megatron_s2lpo.convert.fp8 import Fp8Format, write_fp8_dir
from megatron_s2lpo.rollout.local import LocalEngine
from megatron_s2lpo.rollout.sglang_engine import SGLangEngine
from megatron_s2lpo.sync.base import TransportContext
from megatron_s2lpo.sync.disk import DiskTransport
from megatron_s2lpo.sync.exporter import QuantizingExporter, StateDictExporter
from megatron_s2lpo.sync.transports import DistributedTransport, TensorTransport
from megatron_s2lpo.sync.weight_sync import verify_version
from megatron_s2lpo.utils.ports import free_port

from test_sglang_contract import KEY, SERVER, no_violations, perturbed, replica_gaps, state

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]
FMT = Fp8Format()
# SGLang refuses block FP8 on fused layers whose shards are not whole 128-row blocks
# (Fp8LinearMethod.validate_block_quant_shapes): q 2 x 128, k and v 1 x 128, gate and up 256.
ARCH_KW = dict(family="qwen3", hidden_size=128, ffn_hidden_size=256, num_layers=2, num_attention_heads=2,
               num_query_groups=1, head_dim=128, qk_layernorm=True)


@pytest.fixture(scope="module")
def fp8_model(tmp_path_factory, tok):
    """(block-FP8 dir, arch, the unquantized weights it was written from)."""
    arch = ModelArch(vocab_size=len(tok), **ARCH_KW)
    root = tmp_path_factory.mktemp("fp8-model")
    engine = LocalEngine.from_arch(arch, tokenizer=tok, init_seed=0)
    engine.save_pretrained(str(root / "bf16"))
    write_fp8_dir(str(root / "bf16"), str(root / "fp8"), FMT)
    weights = {n: p.detach().clone() for n, p in engine.model.state_dict().items() if "rotary" not in n}
    return str(root / "fp8"), arch, weights


@pytest.fixture(scope="module")
def fp8_server(fp8_model, sglang_source, tmp_path_factory):
    cfg = EngineConfig(backend="sglang", model_path=fp8_model[0], ports=[free_port()], api_key=KEY,
                       launch_command=SERVER, startup_timeout_s=240, max_retries=1,
                       extra_args=["--sglang-source", sglang_source, "--quantization", "fp8", "--dtype", "bfloat16"])
    engine = SGLangEngine(cfg, name="learner", seed=7, log_dir=str(tmp_path_factory.mktemp("logs")), backoff_s=0.05)
    yield engine
    engine.close()


def served(weights: dict) -> dict:
    """What the server should serve after a push of `weights`: the projections quantized and
    dequantized by us, the rest at the server's --dtype bfloat16."""
    quantized = {n for n, t in weights.items() if FMT.quantizes(n, t)}
    return {n: (t if n in quantized else t.to(torch.bfloat16).float())
            for n, t in FMT.dequantize_named(FMT.quantize_named(weights.items()))}


def test_sglang_builds_fp8_layers_exactly_where_the_sync_quantizes(fp8_server, fp8_model, tok):
    path, arch, weights = fp8_model
    st = state(fp8_server.url)
    assert st["sglang_args"]["quantization"] == "fp8"
    params = st["sglang_params"]  # SGLang's Qwen3ForCausalLM under Fp8Config, after its cold load
    fp8 = sorted(n for n, (dtype, _) in params.items() if dtype == "float8_e4m3fn")
    fused = {"q": "qkv", "k": "qkv", "v": "qkv", "gate": "gate_up", "up": "gate_up", "o": "o", "down": "down"}
    ours = sorted({re.sub(r"\.(q|k|v|o|gate|up|down)_proj\.", lambda m: f".{fused[m.group(1)]}_proj.", n)
                   for n, t in weights.items() if FMT.quantizes(n, t)})
    assert fp8 == ours and len(fp8) == 4 * arch.num_layers
    for name in fp8:
        n, k = params[name][1]
        assert params[name + "_scale_inv"] == ["float32", [-(-n // 128), -(-k // 128)]]
    unquantized = {n: d for n, (d, _) in params.items() if d != "float8_e4m3fn" and not n.endswith("_scale_inv")}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= set(unquantized)
    assert set(unquantized.values()) == {"bfloat16"}
    # SGLang's loader read our file into the same dequantized weights we compute
    assert max(replica_gaps(fp8_server, served(weights), arch, tok)) < 1e-5


def push(transport_name: str, engine: SGLangEngine, weights: dict, arch: ModelArch, version: int, tmp_path) -> None:
    context = TransportContext(arch=arch, quantization=FMT)
    buckets = QuantizingExporter(StateDictExporter(weights, 1 << 17), FMT)
    if transport_name == "disk":
        transport = DiskTransport(engine, SyncConfig(disk_dir=str(tmp_path)), context)
    elif transport_name == "tensor":
        transport = TensorTransport(engine, SyncConfig(), context, check_environment=False, cpu_sharing="file_system")
    else:
        transport = DistributedTransport(engine, SyncConfig(master_address="127.0.0.1", group_backend="gloo",
                                                            group_timeout_s=60), context)
    try:
        with engine.paused():
            stats = transport.push(buckets.flat_buckets() if transport_name == "disk" else buckets.buckets(), version)
            verify_version(engine, version)
        assert stats.num_buckets >= 1
    finally:
        transport.close()


@pytest.mark.parametrize("transport", ["disk", "tensor", "distributed"])
def test_every_transport_pushes_fp8_weights_sglang_loads(fp8_server, fp8_model, tok, tmp_path, transport):
    path, arch, weights = fp8_model
    version = {"disk": 11, "tensor": 12, "distributed": 13}[transport]
    new = perturbed(weights, 0.03 + version / 1000)
    push(transport, fp8_server, new, arch, version, tmp_path)
    assert max(replica_gaps(fp8_server, served(new), arch, tok)) < 1e-5  # SGLang holds exactly what we pushed
    # against the unquantized weights the gap is FP8's rounding: visible, and far below other weights'
    fp8_gap = max(replica_gaps(fp8_server, new, arch, tok))
    other = max(replica_gaps(fp8_server, weights, arch, tok))
    print(f"{transport}: max |logp(FP8 server) - logp(unquantized)| = {fp8_gap:.2e}, "
          f"against the weights before the push {other:.2e}", file=sys.stderr)
    assert 1e-5 < fp8_gap < other
    assert not state(fp8_server.url)["session_open"]
    no_violations(fp8_server)


def test_unquantized_weights_pushed_into_an_fp8_server_are_silently_wrong(fp8_server, fp8_model, tok, tmp_path):
    """Why the trainer must quantize: SGLang's loader copies a float32 tensor into a float8 weight
    (a cast, no scale) and answers success, so only the parity check can tell."""
    path, arch, weights = fp8_model
    new = perturbed(weights, 0.02)
    transport = TensorTransport(fp8_server, SyncConfig(), TransportContext(arch=arch), check_environment=False,
                                cpu_sharing="file_system")
    with fp8_server.paused():
        transport.push(StateDictExporter(new, 1 << 17).buckets(), 20)  # no QuantizingExporter
        verify_version(fp8_server, 20)
    assert max(replica_gaps(fp8_server, served(new), arch, tok)) > 0.1
    push("tensor", fp8_server, new, arch, 21, tmp_path)  # the quantized push repairs it
    assert max(replica_gaps(fp8_server, served(new), arch, tok)) < 1e-5
