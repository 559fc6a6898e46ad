"""The SGLang integration against SGLang 0.5.23's own code (contract-mode protocol servers).

Two replicas run `tests/protocol_server.py --sglang-source <wheel>`: SGLang's `ServerArgs` parses
their command lines (the ones `build_launch_command` renders), SGLang's request types and
validators judge every body the engine sends (a refusal is a 400 and a recorded violation),
SGLang's `SchedulerWeightUpdaterManager` + model-runner `WeightUpdater` run every weight update
(sessions, the update group, the flattened-bucket receive and loader, `MultiprocessingSerializer`),
and SGLang's `api_types.GenerateResponse` encodes every /generate answer the client parses.
See tests/contract/sglang_backend.py for exactly which SGLang code runs and what stands in for a GPU.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from megatron_s2lpo.config.model import ModelArch
from megatron_s2lpo.config.rollout import EngineConfig
from megatron_s2lpo.config.sync import SyncConfig
from megatron_s2lpo.rollout.engine import GenerateRequest
from megatron_s2lpo.rollout.local import LocalEngine
from megatron_s2lpo.rollout.scoring import ScoreRequest
from megatron_s2lpo.rollout.sglang_engine import SGLangEngine
from megatron_s2lpo.sync.base import TransportContext
from megatron_s2lpo.sync.exporter import StateDictExporter
from megatron_s2lpo.sync.transports import DistributedTransport, TensorTransport
from megatron_s2lpo.sync.weight_sync import verify_version
from megatron_s2lpo.utils.ports import free_port

SERVER = [sys.executable, str(Path(__file__).resolve().parents[1] / "protocol_server.py")]
KEY = "contract-key"
SEED = 1234
pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


def call(url: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """A raw call to a server (status, JSON answer), errors included."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read() or b"null")


def state(url: str) -> dict:
    return call(url, "/_test/state")[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory, tok):
    arch = ModelArch(family="qwen3", vocab_size=len(tok), hidden_size=32, ffn_hidden_size=64, num_layers=2,
                     num_attention_heads=4, num_query_groups=2, head_dim=8, qk_layernorm=True)
    path = str(tmp_path_factory.mktemp("contract-model"))
    engine = LocalEngine.from_arch(arch, tokenizer=tok, init_seed=0)
    engine.save_pretrained(path)
    return path, arch, {n: p.detach().clone() for n, p in engine.model.state_dict().items()}


@pytest.fixture(scope="module")
def pool(model, sglang_source, tmp_path_factory):
    """Two contract-mode replicas, as `rollout.learner` with replicas=2 would launch them."""
    cfg = EngineConfig(backend="sglang", model_path=model[0], replicas=2, ports=[free_port(), free_port()],
                       api_key=KEY, deterministic=True, launch_command=SERVER,
                       extra_args=["--sglang-source", sglang_source], startup_timeout_s=240, max_retries=1)
    engine = SGLangEngine(cfg, name="learner", seed=SEED, log_dir=str(tmp_path_factory.mktemp("logs")),
                          backoff_s=0.05)
    yield engine
    engine.close()


def no_violations(engine: SGLangEngine) -> None:
    for url in engine.urls:
        assert state(url)["violations"] == [], url


def test_sglang_server_args_parse_the_launch_command(pool):
    for i, url in enumerate(pool.urls):
        st = state(url)
        assert st["contract"]
        args = st["sglang_args"]  # as SGLang's ServerArgs.from_cli_args read build_launch_command's line
        assert args["port"] == pool.cfg.ports[i] and args["tp_size"] == 1 and args["dp_size"] == 1
        assert args["random_seed"] == SEED + i and args["base_gpu_id"] == i
        assert args["enable_deterministic_inference"] is True and args["api_key"] == KEY


def test_every_request_the_engine_sends_parses_into_sglangs_types(pool, tok):
    gen = [GenerateRequest(request_id=f"c{i}", prompt_ids=tok.encode("1+2="), temperature=0.7, top_p=0.9, top_k=20,
                           max_new_tokens=6, stop=["\n"], stop_token_ids=[tok.eos_token_id], seed=i)
           for i in range(4)]
    comps = pool.generate(gen)  # answers encoded by SGLang's GenerateResponse, parsed by the client
    assert [c.request_id for c in comps] == [r.request_id for r in gen]
    assert all(len(c.logprobs) == len(c.token_ids) > 0 for c in comps)
    scores = pool.score([ScoreRequest(request_id="s0", prompt_ids=tok.encode("1+2="), response_ids=tok.encode("3"),
                                      top_k=3)])
    assert len(scores[0].logprobs) == 1 and len(scores[0].top_ids[0]) == 3
    with pool.paused():  # /pause_generation {mode: abort}, /continue_generation
        pass
    pool.release_memory_occupation(["kv_cache"])
    pool.resume_memory_occupation(["kv_cache"])
    pool.flush_cache()
    for replica in pool.replicas:
        pool._loop.run(replica.client.abort_request("no-such-rid"))
    assert pool.replica_versions() == {"learner[0]": 0, "learner[1]": 0}  # /model_info
    no_violations(pool)
    assert all(state(url)["num_deprecated"] == 0 for url in pool.urls)  # never the deprecated /get_model_info
    # The check can fail: a misspelled field is a violation of our client. The real 0.5.23 server
    # ignores it (the update runs and the version stays: tests/real_sglang/test_real_server.py), and
    # so does the contract server once it has recorded it.
    before = pool.get_model_info()["weight_version"]
    status, answer = call(pool.url, "/update_weights_from_disk", {"model_path": pool.get_model_info()["model_path"],
                                                                  "weight_verison": "1"})
    assert status == 200 and answer["success"] and pool.get_model_info()["weight_version"] == before
    assert any("weight_verison" in v for v in state(pool.url)["violations"])
    status, answer = call(pool.url, "/generate", {"input_ids": [1, 2], "sampling_params": {"top_p": 1.5}})
    assert status == 400 and "top_p must be in (0, 1]" in answer["error"]["message"]
    for url in pool.urls:  # forget the deliberate violations
        call(url, "/_test/faults", {"clear_violations": True})


def test_sglangs_weight_updater_refuses_updates_outside_a_session(pool):
    """What the transports did before sessions: refused by SGLang's own state machine."""
    body = {"names": ["model.norm.weight"], "dtypes": ["float32"], "shapes": [[32]], "group_name": "g"}
    status, answer = call(pool.url, "/update_weights_from_distributed", body)
    assert status == 400 and "must run between begin_weight_update() and end_weight_update()" in answer["message"]
    status, answer = call(pool.url, "/update_weights_from_tensor", {"serialized_named_tensors": ["AAAA"]})
    assert status == 400 and "must run between begin_weight_update() and end_weight_update()" in answer["message"]
    assert call(pool.url, "/end_weight_update", {})[1]["message"].startswith("no weight-update session is open")
    assert call(pool.url, "/begin_weight_update", {})[0] == 200
    assert "already open" in call(pool.url, "/begin_weight_update", {})[1]["message"]
    assert call(pool.url, "/end_weight_update", {})[0] == 200


def replica_gaps(engine: SGLangEngine, weights: dict, arch: ModelArch, tok) -> list[float]:
    """Per replica: max |its log-prob - a LocalEngine holding `weights`| over its own completion."""
    local = LocalEngine.from_arch(arch, tokenizer=tok, init_seed=0)
    local.update_weights_from_tensors(list(weights.items()), version=1)
    gaps = []
    for i in range(len(engine.replicas)):
        (comp,) = engine.replica_engine(i).generate([GenerateRequest(request_id=f"gap{i}", prompt_ids=tok.encode("7*"),
                                                                     max_new_tokens=6)])
        ids = torch.tensor([comp.prompt_ids + comp.token_ids])
        with torch.no_grad():
            logp = torch.log_softmax(local.model(input_ids=ids).logits[0].double(), dim=-1)
        start = len(comp.prompt_ids) - 1
        gaps.append(max(abs(logp[start + j, t].item() - lp) for j, (t, lp) in enumerate(zip(comp.token_ids,
                                                                                             comp.logprobs))))
    return gaps


def perturbed(weights: dict, scale: float) -> dict:
    gen = torch.Generator().manual_seed(int(scale * 1000))
    return {n: t + scale * torch.randn(t.shape, generator=gen) for n, t in weights.items() if "rotary" not in n}


def test_distributed_sync_into_two_replicas_runs_through_sglangs_weight_updater(pool, model, tok):
    path, arch, weights = model
    new = perturbed(weights, 0.05)
    transport = DistributedTransport(pool, SyncConfig(master_address="127.0.0.1", group_backend="gloo",
                                                      group_timeout_s=60), TransportContext(arch=arch))
    try:
        with pool.paused():
            stats = transport.push(StateDictExporter(new, 8192).buckets(), 3)
            verify_version(pool, 3)
        assert stats.num_buckets > 1
        for url in pool.urls:  # SGLang's init_custom_process_group joined one group; its session closed
            st = state(url)
            assert st["groups"] == [transport.group_name] and not st["session_open"] and st["weight_version"] == "3"
        assert max(replica_gaps(pool, new, arch, tok)) < 1e-5
        no_violations(pool)
    finally:
        transport.close()
    assert all(state(url)["groups"] == [] for url in pool.urls)  # /destroy_weights_update_group


def test_tensor_payloads_deserialize_with_sglangs_serializer_into_equal_tensors(pool, model, tok):
    path, arch, weights = model
    new = perturbed(weights, 0.08)
    # CPU tensors cross as shared-memory files here; on GPUs they are CUDA IPC handles (GPU tier).
    transport = TensorTransport(pool, SyncConfig(), TransportContext(arch=arch), check_environment=False,
                                cpu_sharing="file_system")
    with pool.paused():
        stats = transport.push(StateDictExporter(new, 8192).buckets(), 4)
        verify_version(pool, 4)
    assert stats.num_buckets > 1 and not any(state(url)["session_open"] for url in pool.urls)
    assert max(replica_gaps(pool, new, arch, tok)) < 1e-5  # every tensor rebuilt bit for bit, on both replicas
    no_violations(pool)


def test_disk_sync_reaches_every_replica_with_sglangs_request_type(pool, model, tok, tmp_path):
    path, arch, weights = model
    pool.update_weights_from_disk(path, version=5)
    assert pool.replica_versions() == {"learner[0]": 5, "learner[1]": 5}
    assert max(replica_gaps(pool, {n: t for n, t in weights.items() if "rotary" not in n}, arch, tok)) < 1e-5
    no_violations(pool)
