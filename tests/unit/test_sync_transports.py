"""The transports on their own: disk atomicity and pruning, routing, and the GPU transports.

What the GPU transports' tests cover on CPU, and what they do not:
- `tensor` (CUDA IPC): the refusal on a machine without CUDA, one weight-update session per push
  with flush on the last bucket, SGLang's flattened-bucket layout (aligned offsets, bit-exact
  rebuild). SGLang deserializing the payload: tests/contract. NOT covered: CUDA IPC handles, the
  UUID device naming, a live server opening the handles.
- `distributed`: the refusals (no CUDA for nccl, dp_size > 1, a TP size the group does not
  expect, an in-process engine), and with sync.group_backend=gloo into TWO protocol-server
  replicas over real HTTP: one group (rank offsets 1 and 2, world size 3), one broadcast per
  bucket reaching both, every replica's weights bit-exact, sessions closed, the group reused and
  destroyed on close; a refused bucket failing at once (not at the group timeout) with every
  session ended and the next push rebuilding the group. NOT covered: NCCL itself.
"""


from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megatron_s2lpo.config.model import ModelArch
from megatron_s2lpo.config.sync import SyncConfig
from megatron_s2lpo.rollout.local import LocalEngine
from megatron_s2lpo.sync.base import TransportContext
from megatron_s2lpo.sync.disk import DiskTransport, sync_dir_name
from megatron_s2lpo.sync.exporter import StateDictExporter
from megatron_s2lpo.sync.transports import DistributedTransport, TensorTransport, build_transport, route
from megatron_s2lpo.utils.ports import free_port

ARCH = ModelArch(family="llama", vocab_size=64, hidden_size=16, ffn_hidden_size=24, num_layers=1,
                 num_attention_heads=2, num_query_groups=1, head_dim=8, tie_word_embeddings=True)
CONTEXT = TransportContext(arch=ARCH)


def state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    model = LocalEngine.from_arch(ARCH, init_seed=seed).model
    return {n: torch.randn(t.shape, generator=gen) for n, t in model.state_dict().items() if n != "lm_head.weight"}


class DiskEngine:
    """Records the directories it is told to load, checking each is complete at that moment."""

    def __init__(self) -> None:
        self.loaded: list[tuple[str, int]] = []
        self.weight_version = 0

    def update_weights_from_disk(self, path: str, version: int) -> None:
        assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
        assert os.path.isfile(os.path.join(path, "config.json"))
        self.loaded.append((path, version))
        self.weight_version = version


def disk(tmp_path, engine, **config) -> DiskTransport:
    return DiskTransport(engine, SyncConfig(disk_dir=str(tmp_path), **config), CONTEXT)


def test_disk_push_is_loadable_and_engine_sees_only_final_dirs(tmp_path):
    engine = LocalEngine.from_arch(ARCH, init_seed=9)
    weights = state(1)
    stats = disk(tmp_path, engine).push(StateDictExporter(weights, 4096).flat_buckets(), 7)
    assert stats.path == str(tmp_path / sync_dir_name(7)) and stats.num_buckets > 1
    assert stats.num_bytes == sum(t.numel() * 4 for t in weights.values())
    loaded = engine.model.state_dict()
    assert all(torch.equal(loaded[n], t) for n, t in weights.items())
    assert torch.equal(loaded["lm_head.weight"], weights["model.embed_tokens.weight"])  # tied
    assert os.listdir(tmp_path) == [sync_dir_name(7)]


def test_disk_crash_mid_write_leaves_no_directory_and_engine_untouched(tmp_path):
    engine = DiskEngine()

    def crashing():
        yield list(state(1).items())[:2]
        raise RuntimeError("learner died")

    transport = disk(tmp_path, engine)
    with pytest.raises(RuntimeError, match="learner died"):
        transport.push(crashing(), 1)
    assert os.listdir(tmp_path) == [] and engine.loaded == []


def test_disk_removes_partial_dirs_and_prunes_old_and_abandoned_versions(tmp_path):
    (tmp_path / ".tmp-weights_v00000003-123").mkdir()  # left by a crash
    (tmp_path / sync_dir_name(50)).mkdir()  # an abandoned run's later version
    (tmp_path / "unrelated").mkdir()
    engine = DiskEngine()
    transport = disk(tmp_path, engine, disk_keep=2)
    assert sorted(os.listdir(tmp_path)) == ["unrelated", sync_dir_name(50)]
    for version in (1, 2, 3):
        transport.push(StateDictExporter(state(version), 1 << 20).flat_buckets(), version)
    assert sorted(os.listdir(tmp_path)) == ["unrelated", sync_dir_name(2), sync_dir_name(3)]
    assert [v for _, v in engine.loaded] == [1, 2, 3]
    assert all(os.path.basename(p).startswith("weights_v") for p, _ in engine.loaded)


def test_disk_copies_config_and_tokenizer_from_hf_config_dir(tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "marker": 1}')
    (src / "tokenizer.json").write_text("{}")
    transport = DiskTransport(DiskEngine(), SyncConfig(disk_dir=str(tmp_path / "out")),
                              TransportContext(arch=ARCH, hf_config_dir=str(src)))
    stats = transport.push(StateDictExporter(state(), 1 << 20).flat_buckets(), 1)
    assert '"marker": 1' in open(os.path.join(stats.path, "config.json")).read()
    assert os.path.isfile(os.path.join(stats.path, "tokenizer.json"))


def test_disk_needs_a_directory():
    with pytest.raises(ValueError, match="sync.disk_dir is empty"):
        DiskTransport(DiskEngine(), SyncConfig(), CONTEXT)


class FakeServer:
    """The SGLangEngine surface the routing and the refusals read."""

    def __init__(self, *, tp_size: int = 1, dp_size: int = 1, reported_tp: int | None = None) -> None:
        self.cfg = SimpleNamespace(tp_size=tp_size, dp_size=dp_size)
        self.url = "http://127.0.0.1:30000"
        self.name = "fake-sglang"
        self.replicas = [SimpleNamespace(dp_size=dp_size, tp_size=reported_tp, describe=lambda: "replica learner[0]")]
        self.weight_version = 0
        self.sessions: list[str] = []
        self.calls: list[tuple[str, dict]] = []

    def get_model_info(self) -> dict:
        return {"weight_version": str(self.weight_version)}

    def submit_update_weights_from_distributed(self, replicas, **body):
        raise AssertionError("not reached")

    @contextlib.contextmanager
    def weight_update_session(self, version):
        self.sessions.append("begin")
        yield
        self.sessions.append("end")
        self.weight_version = version

    def update_weights_from_tensors(self, named_tensors, version, flush=True, cpu_sharing=None):
        assert self.sessions[-1] == "begin", "a tensor update outside a session"
        self.calls.append(("tensor", {"names": [n for n, _ in named_tensors], "version": version, "flush": flush}))


def test_routing_by_engine_kind():
    server, local = FakeServer(), LocalEngine.from_arch(ARCH)
    assert route("disk", server) == "disk" and route("disk", local) == "buckets"
    assert route("tensor", server) == "tensor" and route("tensor", local) == "buckets"
    assert route("distributed", server) == "distributed"
    with pytest.raises(ValueError, match="needs an SGLang server as the learner's engine, got the in-process "
                                         "LocalEngine"):
        route("distributed", local)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_transports_refuse_without_cuda():
    with pytest.raises(ValueError, match=r"sync.transport=tensor needs CUDA \(missing here\)"):
        build_transport("tensor", FakeServer(), SyncConfig(), CONTEXT)
    with pytest.raises(ValueError, match=r"sync.transport=distributed needs CUDA .*group_backend=gloo"):
        build_transport("distributed", FakeServer(), SyncConfig(master_address="127.0.0.1"), CONTEXT)


def test_distributed_refuses_data_parallel_servers_mismatched_tp_and_in_process_engines():
    gloo = SyncConfig(master_address="127.0.0.1", group_backend="gloo")
    with pytest.raises(ValueError, match=r"replica learner\[0\] runs dp_size=2, and SGLang 0.5.23 refuses.*"
                                         r"rollout.learner.replicas"):
        DistributedTransport(FakeServer(dp_size=2), gloo, CONTEXT)
    with pytest.raises(ValueError, match=r"replica learner\[0\] runs tp_size=2, but the update group gives every "
                                         r"replica rollout.learner.tp_size=1 ranks"):
        DistributedTransport(FakeServer(reported_tp=2), gloo, CONTEXT)
    with pytest.raises(ValueError, match="needs an SGLang engine"):
        DistributedTransport(LocalEngine.from_arch(ARCH), gloo, CONTEXT)


def test_tensor_transport_is_one_session_with_flush_on_the_last_bucket():
    server = FakeServer()
    weights = state()
    transport = TensorTransport(server, SyncConfig(), CONTEXT, check_environment=False)
    stats = transport.push(StateDictExporter(weights, 2048).buckets(), 3)
    assert server.sessions == ["begin", "end"] and server.weight_version == 3
    assert [c[0] for c in server.calls] == ["tensor"] * stats.num_buckets and stats.num_buckets > 2
    assert [n for _, c in server.calls for n in c["names"]] == list(weights)
    assert [c["flush"] for _, c in server.calls] == [False] * (stats.num_buckets - 1) + [True]
    assert {c["version"] for _, c in server.calls} == {3}


def test_flattened_buckets_are_aligned_and_rebuild_bit_exact():
    from megatron_s2lpo.rollout.sglang_tensors import pack_bucket, unpack_bucket

    bucket = [("a", torch.randn(3).to(torch.bfloat16)), ("b", torch.randn(5)), ("c", torch.arange(7, dtype=torch.int8)),
              ("d", torch.randn(2, 3, dtype=torch.float64))]
    flat, metadata = pack_bucket(bucket)
    assert flat.dtype == torch.uint8 and flat.numel() == sum(t.numel() * t.element_size() for _, t in bucket)
    assert [m.name for m in metadata] == ["d", "b", "a", "c"]  # larger dtypes first: every offset aligned
    assert all(m.start_idx % m.dtype.itemsize == 0 for m in metadata)
    rebuilt = dict(unpack_bucket(flat, metadata))
    for name, tensor in bucket:
        assert rebuilt[name].dtype == tensor.dtype and torch.equal(rebuilt[name], tensor), name
    # a bucket already back to back in one buffer (the exporter's flat buffer) is sent as it is
    buffer = torch.randint(0, 255, (64,), dtype=torch.uint8)
    views = [("x", buffer[:16].view(torch.float32)), ("y", buffer[16:48].view(torch.bfloat16)),
             ("z", buffer[48:64].view(torch.float64))]
    flat, metadata = pack_bucket(views)
    assert flat.data_ptr() == buffer.data_ptr() and flat.numel() == 64  # no copy
    assert [m.name for m in metadata] == ["x", "y", "z"] and [m.start_idx for m in metadata] == [0, 16, 48]
    gapped = [("x", buffer[:16].view(torch.float32)), ("z", buffer[32:48].view(torch.float64))]
    assert pack_bucket(gapped)[0].data_ptr() != buffer.data_ptr()  # a gap: packed into a copy


def test_a_flattened_bucket_that_does_not_match_its_metadata_is_never_serialized():
    """Real SGLang 0.5.23 rebuilds a tensor-route bucket from its metadata inside the scheduler
    without a guard: a truncated buffer or wrong metadata makes the whole server exit."""
    from megatron_s2lpo.rollout.sglang_tensors import check_flattened, pack_bucket, serialize_per_rank

    def packed():
        return pack_bucket([("a", torch.randn(4, 2)), ("b", torch.randn(3, dtype=torch.float64))])

    flat, metadata = packed()
    check_flattened(flat, metadata)
    assert len(serialize_per_rank(flat, metadata, 2, cpu_sharing="file_system")) == 2
    with pytest.raises(ValueError, match="holds 48 bytes but its metadata describes 56"):
        serialize_per_rank(flat[:-8], metadata, 1, cpu_sharing="file_system")  # truncated
    with pytest.raises(ValueError, match="holds 64 bytes"):
        check_flattened(torch.cat([flat, flat[:8]]), metadata)  # padded
    for field, value, match in (("shape", torch.Size([4, 3]), "takes"), ("numel", 7, "numel 7"),
                                ("start_idx", 8, r"bytes \[8,"), ("name", "b", "appears twice"),
                                ("dtype", "float32", "is not a tensor's")):
        flat, metadata = packed()
        setattr(metadata[1], field, value)
        with pytest.raises(ValueError, match=match):
            serialize_per_rank(flat, metadata, 1, cpu_sharing="file_system")
    flat, metadata = packed()
    with pytest.raises(ValueError, match="contiguous uint8"):
        check_flattened(flat.view(torch.float32), metadata)
    with pytest.raises(ValueError, match="at least one tensor"):
        check_flattened(flat, [])
    unaligned = [SimpleNamespace(name="c", shape=torch.Size([1]), dtype=torch.bfloat16, start_idx=0, end_idx=2, numel=2),
                 SimpleNamespace(name="d", shape=torch.Size([]), dtype=torch.float32, start_idx=2, end_idx=6, numel=4)]
    with pytest.raises(ValueError, match="byte offset 2 is not a multiple of its dtype's size 4"):
        check_flattened(torch.zeros(6, dtype=torch.uint8), unaligned)


# ----- the distributed transport over gloo into protocol-server replicas (real HTTP, real gloo) -----

SERVER = [sys.executable, str(Path(__file__).resolve().parents[1] / "protocol_server.py")]


def server_state(url: str) -> dict:
    with urllib.request.urlopen(url + "/_test/state", timeout=30) as resp:
        return json.loads(resp.read())


def fault(url: str, **body) -> None:
    req = urllib.request.Request(url + "/_test/faults", data=json.dumps(body).encode())
    urllib.request.urlopen(req, timeout=30).read()


# Replica 1 serves ANOTHER model of the same shapes (rms_norm_eps 1 instead of 1e-6): a sync moves the same
# weights into both, the weight-parity check on replica 1 must fail and name it.
REPLICA_ARCHS = (ARCH, dataclasses.replace(ARCH, rms_norm_eps=1.0))


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    """Two protocol-server replicas attached as one engine (ARCH, and ARCH with another rms_norm_eps)."""
    from megatron_s2lpo.config.rollout import EngineConfig
    from megatron_s2lpo.rollout.sglang_engine import SGLangEngine
    from megatron_s2lpo.rollout.sglang_server import ServerProcess

    procs, urls = [], []
    for i, arch in enumerate(REPLICA_ARCHS):
        path, port = str(tmp_path_factory.mktemp(f"model{i}")), free_port()
        LocalEngine.from_arch(arch, init_seed=0).save_pretrained(path)
        procs.append(ServerProcess(SERVER + ["--model-path", path, "--port", str(port)]))
        urls.append(f"http://127.0.0.1:{port}")
    for proc in procs:
        proc.start()
    try:
        engine = SGLangEngine(EngineConfig(backend="sglang", urls=urls, startup_timeout_s=90, max_retries=1),
                              name="learner", backoff_s=0.05)
        yield engine
        engine.close()
    finally:
        for proc in procs:
            proc.stop(remove_log=True)


def reference_logprobs(weights: dict, engine, prompt: list[int]) -> list[float]:
    """Per replica: max |its log-prob of its own completion - a LocalEngine of its arch holding `weights`|."""
    from megatron_s2lpo.rollout.engine import GenerateRequest

    out = []
    for i in range(len(engine.replicas)):
        local = LocalEngine.from_arch(REPLICA_ARCHS[i], init_seed=0)
        local.update_weights_from_tensors(list(weights.items()), version=1)
        (comp,) = engine.replica_engine(i).generate([GenerateRequest(request_id=f"p{i}", prompt_ids=prompt,
                                                                     max_new_tokens=6)])
        ids = torch.tensor([comp.prompt_ids + comp.token_ids])
        with torch.no_grad():
            logp = torch.log_softmax(local.model(input_ids=ids).logits[0].double(), dim=-1)
        start = len(prompt) - 1
        out.append(max(abs(logp[start + j, t].item() - lp) for j, (t, lp) in enumerate(zip(comp.token_ids,
                                                                                             comp.logprobs))))
    return out


@pytest.mark.timeout(120)
def test_distributed_transport_reaches_every_replica_with_one_broadcast_per_bucket(replicas):
    weights = state(2)
    weights["model.norm.weight"] = weights["model.norm.weight"].to(torch.bfloat16)  # mixed dtypes
    config = SyncConfig(master_address="127.0.0.1", group_backend="gloo", group_timeout_s=30)
    transport = DistributedTransport(replicas, config, CONTEXT)
    with replicas.paused():
        stats = transport.push(StateDictExporter(weights, 2048).buckets(), 5)
    assert stats.num_buckets > 2 and transport.group_name.startswith("s2lpo_weight_sync_")
    for url in replicas.urls:
        st = server_state(url)
        assert st["groups"] == [transport.group_name] and not st["session_open"] and st["weight_version"] == "5"
    assert replicas.replica_versions() == {"learner[0]": 5, "learner[1]": 5}
    norm = {n: (t.float() if t.dtype == torch.bfloat16 else t) for n, t in weights.items()}
    assert max(reference_logprobs(norm, replicas, [1, 2, 3])) < 1e-5  # both replicas hold exactly these weights
    group = transport.group_name
    transport.push(StateDictExporter(state(3), 1 << 20).buckets(), 6)  # the group is reused
    assert transport.group_name == group and max(reference_logprobs(state(3), replicas, [4, 5])) < 1e-5
    transport.close()
    assert all(server_state(url)["groups"] == [] for url in replicas.urls)  # destroyed on every replica


@pytest.mark.timeout(120)
def test_weight_sync_checks_every_replica_version_and_parity_rotates_and_names_the_replica(replicas):
    from test_sync_weight_sync import HFLearner  # the parity learner: teacher-forced, float64

    from megatron_s2lpo.sync.errors import WeightParityError
    from megatron_s2lpo.sync.weight_sync import WeightSync

    learner = LocalEngine.from_arch(ARCH, init_seed=3).model
    weights = {n: t for n, t in learner.state_dict().items() if n != "lm_head.weight"}
    sync = WeightSync(None, SimpleNamespace(rank=0, world_size=1, dp_rank=0), ARCH, replicas,
                      SyncConfig(transport="distributed", group_backend="gloo", master_address="127.0.0.1",
                                 group_timeout_s=30, parity_num_sequences=2, parity_max_new_tokens=4,
                                 parity_threshold=1e-4),
                      learner=HFLearner(learner), exporter=StateDictExporter(weights, 1 << 20))
    try:
        base = replicas.weight_version
        first = sync.sync(base + 1)  # parity on replica 0: the learner's model
        assert first.parity.mean_abs_diff < 1e-5 and "learner[0]" in first.parity.engine
        with pytest.raises(WeightParityError, match=rf"SGLang replica learner\[1\] at {replicas.urls[1]}"):
            sync.sync(base + 2)  # parity on replica 1: the same weights in another model
        assert replicas.replica_versions() == {"learner[0]": base + 2, "learner[1]": base + 2}
    finally:
        sync.close()


@pytest.mark.timeout(120)
def test_a_refused_bucket_fails_at_once_ends_every_session_and_the_next_push_rebuilds_the_group(replicas):
    from megatron_s2lpo.rollout.engine import GenerateRequest
    from megatron_s2lpo.rollout.sglang_client import EngineRequestError

    config = SyncConfig(master_address="127.0.0.1", group_backend="gloo", group_timeout_s=20)
    transport = DistributedTransport(replicas, config, CONTEXT)
    fault(replicas.urls[1], refuse_updates=1)
    start = time.monotonic()
    with pytest.raises(EngineRequestError, match=r"replica learner\[1\] at .*HTTP 400.*no receive posted"):
        with replicas.paused():
            transport.push(StateDictExporter(state(4), 2048).buckets(), 7)
    assert time.monotonic() - start < 10  # not the group timeout: the refusal is seen at once
    assert not any(server_state(url)["session_open"] for url in replicas.urls)  # ended everywhere
    with pytest.raises(EngineRequestError, match="last weight update of engine learner failed"):
        replicas.generate([GenerateRequest(request_id="x", prompt_ids=[1], max_new_tokens=2)])
    broken = transport.group_name
    with replicas.paused():
        transport.push(StateDictExporter(state(4), 2048).buckets(), 8)
    assert transport.group_name != broken and replicas.weight_version == 8
    assert replicas.generate([GenerateRequest(request_id="y", prompt_ids=[1], max_new_tokens=2)])[0].weight_version == 8
    start = time.monotonic()
    transport.close()
    assert time.monotonic() - start < 10
