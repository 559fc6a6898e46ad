"""The transports on their own: disk atomicity and pruning, routing, and the GPU transports'
call sequences against fake SGLang engines.

What the GPU transports' tests cover on CPU, and what they do not:
- `tensor` (CUDA IPC): the refusal on a machine without CUDA / SGLang, and with the environment
  check disabled, the sequence of `update_weights_from_tensors(bucket, version, flush)` calls
  (every tensor once, in export order, flush on the last bucket only). NOT covered: pickling
  CUDA IPC handles, SGLang's UUID device patch, a live server opening the handles.
- `distributed` (NCCL): the refusals (no CUDA, dp_size > 1, an in-process engine), and with
  backend="gloo" against a fake server PROCESS that joins the group exactly as SGLang's
  `init_custom_process_group` does and receives with `broadcast(src=0)` per name, in order:
  the /init_weights_update_group fields (rank_offset 1, world size 1 + TP, unique group name),
  the per-bucket /update_weights_from_distributed fields (names, dtype strings, shapes, group,
  version, flush on the last bucket), bit-exact tensors on the receiving side for mixed dtypes,
  and a refused bucket raising instead of hanging. NOT covered: NCCL itself, a real SGLang
  server loading the received tensors.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from types import SimpleNamespace

import pytest
import torch

from megatron_s2lpo.config.model import ModelArch
from megatron_s2lpo.config.sync import SyncConfig
from megatron_s2lpo.rollout.local import LocalEngine
from megatron_s2lpo.sync.base import TransportContext
from megatron_s2lpo.sync.disk import DiskTransport, sync_dir_name
from megatron_s2lpo.sync.exporter import StateDictExporter
from megatron_s2lpo.sync.transports import (DistributedTransport, TensorTransport, build_transport,
                                            init_custom_group, route)

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
    """The SGLangEngine surface the GPU transports use; records every call."""

    def __init__(self, *, tp_size: int = 1, dp_size: int = 1) -> None:
        self.cfg = SimpleNamespace(tp_size=tp_size, dp_size=dp_size)
        self.url = "http://127.0.0.1:30000"
        self.name = "fake-sglang"
        self.calls: list[tuple[str, dict]] = []
        self.weight_version = 0

    def get_model_info(self) -> dict:
        return {"weight_version": str(self.weight_version)}

    def update_weights_from_tensors(self, named_tensors, version, flush=True):
        self.calls.append(("tensor", {"names": [n for n, _ in named_tensors], "version": version, "flush": flush}))
        self.weight_version = version


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
    with pytest.raises(ValueError, match=r"sync.transport=tensor needs CUDA and SGLang \(missing here: CUDA"):
        build_transport("tensor", FakeServer(), SyncConfig(), CONTEXT)
    with pytest.raises(ValueError, match=r"sync.transport=distributed needs CUDA and SGLang \(missing here: CUDA"):
        build_transport("distributed", FakeServer(), SyncConfig(), CONTEXT)


def test_distributed_refuses_data_parallel_servers_and_in_process_engines():
    with pytest.raises(ValueError, match="dp_size=2, and SGLang 0.5.23 refuses"):
        DistributedTransport(DistributedFakeServer(None, dp_size=2), SyncConfig(), CONTEXT, check_environment=False)
    with pytest.raises(ValueError, match="needs an SGLang engine"):
        DistributedTransport(LocalEngine.from_arch(ARCH), SyncConfig(), CONTEXT, check_environment=False)


def test_tensor_transport_call_sequence():
    server = FakeServer()
    weights = state()
    transport = TensorTransport(server, SyncConfig(), CONTEXT, check_environment=False)
    stats = transport.push(StateDictExporter(weights, 2048).buckets(), 3)
    assert [c[0] for c in server.calls] == ["tensor"] * stats.num_buckets and stats.num_buckets > 2
    assert [n for _, c in server.calls for n in c["names"]] == list(weights)
    assert [c["flush"] for _, c in server.calls] == [False] * (stats.num_buckets - 1) + [True]
    assert {c["version"] for _, c in server.calls} == {3}


# ----- distributed transport over gloo against a fake server process -----

def _fake_server_process(conn) -> None:
    """Plays SGLang's side: joins the group as rank_offset + tp_rank, receives per name with src=0."""
    group = None
    while True:
        cmd, body = conn.recv()
        if cmd == "stop":
            return
        if cmd == "init":
            group = init_custom_group(body["backend"], body["master_address"], body["master_port"],
                                      body["world_size"], body["rank_offset"] + 0, body["group_name"])
            conn.send(("ok", None))
        elif cmd == "update":
            received = []
            handles = []
            for name, dtype, shape in zip(body["names"], body["dtypes"], body["shapes"]):
                tensor = torch.empty(shape, dtype=getattr(torch, dtype))
                handles.append(torch.distributed.broadcast(tensor, src=0, group=group, async_op=True))
                received.append((name, tensor))
            for handle in handles:
                handle.wait()
            conn.send(("ok", received))


class DistributedFakeServer(FakeServer):
    def __init__(self, conn, *, refuse_bucket: int | None = None, dp_size: int = 1) -> None:
        super().__init__(dp_size=dp_size)
        self.conn = conn
        self.received: list[tuple[str, torch.Tensor]] = []
        self.refuse_bucket = refuse_bucket

    def init_weights_update_group(self, **body):
        self.calls.append(("init", body))
        self.conn.send(("init", body))
        assert self.conn.recv()[0] == "ok"
        return {"success": True}

    def update_weights_from_distributed(self, *, names, dtypes, shapes, version, group_name, flush):
        body = dict(names=names, dtypes=dtypes, shapes=shapes, version=version, group_name=group_name, flush=flush)
        self.calls.append(("update", body))
        if self.refuse_bucket is not None and len(self.calls) - 1 == self.refuse_bucket:
            raise RuntimeError("HTTP 400: Failed to update parameter online")  # posts no receives
        self.conn.send(("update", body))
        self.received.extend(self.conn.recv()[1])
        self.weight_version = version
        return {"success": True}


@pytest.fixture
def server_process():
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_fake_server_process, args=(child,), daemon=True)
    proc.start()
    yield parent
    if proc.is_alive():
        try:
            parent.send(("stop", None))
        except OSError:
            pass
        proc.join(5)
    if proc.is_alive():
        proc.kill()


@pytest.mark.timeout(60)
def test_distributed_transport_over_gloo(server_process):
    server = DistributedFakeServer(server_process)
    weights = state(2)
    weights["model.norm.weight"] = weights["model.norm.weight"].to(torch.bfloat16)  # mixed dtypes
    transport = DistributedTransport(server, SyncConfig(master_address="127.0.0.1"), CONTEXT,
                                     backend="gloo", check_environment=False)
    stats = transport.push(StateDictExporter(weights, 2048).buckets(), 5)
    kind, init = server.calls[0]
    assert kind == "init" and init["rank_offset"] == 1 and init["world_size"] == 2
    assert init["backend"] == "gloo" and init["master_address"] == "127.0.0.1" and init["master_port"] > 0
    assert init["group_name"] == transport.group_name and transport.group_name.startswith("s2lpo_weight_sync_")
    updates = [body for kind, body in server.calls[1:]]
    assert len(updates) == stats.num_buckets > 2
    assert [n for body in updates for n in body["names"]] == list(weights)
    assert [body["flush"] for body in updates] == [False] * (len(updates) - 1) + [True]
    assert all(body["version"] == 5 and body["group_name"] == transport.group_name for body in updates)
    dtypes = dict(zip([n for b in updates for n in b["names"]], [d for b in updates for d in b["dtypes"]]))
    assert dtypes["model.norm.weight"] == "bfloat16" and dtypes["model.embed_tokens.weight"] == "float32"
    assert [n for n, _ in server.received] == list(weights)
    for name, tensor in server.received:
        assert tensor.dtype == weights[name].dtype and torch.equal(tensor, weights[name]), name
    stats2 = transport.push(StateDictExporter(state(3), 1 << 20).buckets(), 6)  # the group is reused
    assert stats2.num_buckets == 1 and [k for k, _ in server.calls].count("init") == 1
    transport.close()


@pytest.mark.timeout(60)
def test_distributed_transport_refused_bucket_raises(server_process):
    server = DistributedFakeServer(server_process, refuse_bucket=1)
    transport = DistributedTransport(server, SyncConfig(master_address="127.0.0.1"), CONTEXT,
                                     backend="gloo", check_environment=False)
    with pytest.raises(RuntimeError, match="HTTP 400"):
        transport.push(StateDictExporter(state(), 2048).buckets(), 1)
    with pytest.raises(RuntimeError, match="broke in an earlier failed push"):
        transport.push(StateDictExporter(state(), 2048).buckets(), 2)
    transport.close()
