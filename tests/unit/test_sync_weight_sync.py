"""WeightSync end to end in one process, without megatron: HF tensors -> LocalEngine.

The learner side is a plain transformers model: its state dict is the bucket source
(`StateDictExporter`) and its teacher-forced log-probs (one row at a time, float64 softmax, the
slow obvious reference) play `Learner.compute_logprobs`. The megatron export and the TP / PP /
DP paths are covered by tests/distributed/test_sync_distributed.py.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch

from megatron_s2lpo.config.model import ModelArch
from megatron_s2lpo.config.sync import SyncConfig
from megatron_s2lpo.rollout.local import LocalEngine
from megatron_s2lpo.sync.errors import WeightParityError, WeightVersionError
from megatron_s2lpo.sync.exporter import StateDictExporter
from megatron_s2lpo.sync.weight_sync import WeightSync

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = ModelArch(family="qwen3", vocab_size=128, hidden_size=32, ffn_hidden_size=48, num_layers=2,
                 num_attention_heads=4, num_query_groups=2, head_dim=8, qk_layernorm=True, rope_theta=10000.0)
ONE_RANK = SimpleNamespace(rank=0, world_size=1, dp_rank=0)


class HFLearner:
    """`compute_logprobs` of a transformers model, row by row, softmax in float64."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    @torch.no_grad()
    def compute_logprobs(self, batch, temperature: float = 1.0) -> torch.Tensor:
        out = torch.zeros(batch.tokens.shape)
        for b in range(batch.num_seqs):
            length = int(batch.seq_lens[b])
            tokens = batch.tokens[b, :length]
            logits = self.model(input_ids=tokens[None]).logits[0].double() / temperature  # (L, V)
            logp = torch.log_softmax(logits, dim=-1)
            for t in range(1, length):
                out[b, t] = logp[t - 1, tokens[t]]
        return out


def learner_model(seed: int = 1) -> torch.nn.Module:
    return LocalEngine.from_arch(ARCH, init_seed=seed).model


def make_sync(model, engine, *, bucket_bytes: int = 1 << 20, **config) -> WeightSync:
    cfg = SyncConfig(**{"parity_num_sequences": 3, "parity_max_new_tokens": 6, "parity_threshold": 1e-4,
                        **config})
    return WeightSync(None, ONE_RANK, ARCH, engine, cfg, learner=HFLearner(model), temperature=0.8,
                      exporter=StateDictExporter(model.state_dict(), bucket_bytes))


def assert_same_weights(engine: LocalEngine, model: torch.nn.Module) -> None:
    theirs = engine.model.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(theirs[name], tensor), name


def test_disk_with_in_process_engine_hands_buckets_over_and_parity_passes():
    model, engine = learner_model(1), LocalEngine.from_arch(ARCH, init_seed=2)
    sync = make_sync(model, engine)
    assert sync.transport_name == "buckets"
    with pytest.raises(WeightParityError):  # different random weights before the sync
        sync.check_parity()
    result = sync.sync(1)
    assert_same_weights(engine, model)
    assert engine.weight_version == 1 and result.version == 1 and result.path is None
    assert result.num_bytes == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert result.num_buckets == 1 and result.gb_per_s > 0
    assert result.parity is not None and result.parity.mean_abs_diff < 1e-5
    assert result.parity.num_sequences == 3 and result.parity.num_tokens >= 3
    metrics = result.metrics()
    assert {"sync/seconds", "sync/gb_per_s", "parity/mean_abs_logp_diff"} <= set(metrics)


def test_forced_disk_transport_writes_a_complete_hf_dir(tmp_path):
    model, engine = learner_model(1), LocalEngine.from_arch(ARCH, init_seed=2)
    sync = WeightSync(None, ONE_RANK, ARCH, engine, SyncConfig(disk_dir=str(tmp_path / "sync"), parity_every=0),
                      transport="disk", exporter=StateDictExporter(model.state_dict(), 16 * 1024))
    result = sync.sync(3)
    assert result.transport == "disk" and result.path == str(tmp_path / "sync" / "weights_v00000003")
    assert result.num_buckets > 1
    files = sorted(os.listdir(result.path))
    assert "model.safetensors.index.json" in files and "config.json" in files
    with open(os.path.join(result.path, "config.json")) as f:
        config = json.load(f)
    assert ModelArch.from_hf_config(config) == ARCH and config["torch_dtype"] == "float32"
    assert_same_weights(engine, model)
    assert engine.weight_version == 3


@pytest.mark.parametrize("perturb", ["learner", "engine"])
def test_parity_fails_when_weights_differ(perturb):
    model, engine = learner_model(1), LocalEngine.from_arch(ARCH, init_seed=2)
    sync = make_sync(model, engine)
    sync.sync(1)
    target = model if perturb == "learner" else engine.model
    with torch.no_grad():
        target.model.layers[1].mlp.down_proj.weight.add_(0.05 * torch.randn_like(target.model.layers[1].mlp.down_proj.weight))
    with pytest.raises(WeightParityError) as info:
        sync.check_parity()
    message = str(info.value)
    for part in ("weight version 1", "mean |delta logp|", "sync.parity_threshold=0.0001", "Likely causes",
                 "LocalEngine", "temperature 0.8"):
        assert part in message
    assert info.value.report.mean_abs_diff > 1e-4 and not info.value.report.passed
    sync.sync(2)  # a new sync brings the engine back in line (the learner's current weights)
    assert sync.check_parity().mean_abs_diff < 1e-5


def test_versions_must_increase():
    model, engine = learner_model(1), LocalEngine.from_arch(ARCH, init_seed=2, weight_version=5)
    sync = make_sync(model, engine, parity_every=0)
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="weight version"):
            sync.sync(bad)
    with pytest.raises(ValueError, match="already reports 5"):
        sync.sync(5)
    sync.sync(6)
    with pytest.raises(ValueError, match="does not increase: the last sync pushed 6"):
        sync.sync(6)


class VersionIgnoringEngine(LocalEngine):
    """Takes the weights but keeps its old version (a server that dropped the version field)."""

    def update_weights_from_tensors(self, named_tensors, version, flush=True):
        super().update_weights_from_tensors(named_tensors, None, flush)


def test_version_not_taken_raises_naming_engine_and_versions():
    model = learner_model(1)
    engine = VersionIgnoringEngine(LocalEngine.from_arch(ARCH, init_seed=2).model, model_id="tiny-engine")
    sync = make_sync(model, engine, parity_every=0)
    with pytest.raises(WeightVersionError, match=r"VersionIgnoringEngine model_id=tiny-engine reports weight "
                                                 r"version \{'weight_version': 0\} after a push of version 4"):
        sync.sync(4)


class RecordingEngine:
    """An in-process engine that records every update and forwards it to a LocalEngine."""

    def __init__(self, inner: LocalEngine) -> None:
        self.inner = inner
        self.calls: list[tuple[list[str], int, bool]] = []
        self.events: list[str] = []

    @property
    def weight_version(self) -> int:
        return self.inner.weight_version

    def generate(self, requests):
        return self.inner.generate(requests)

    def onload(self):
        self.events.append("onload")

    def update_weights_from_tensors(self, named_tensors, version, flush=True):
        named = list(named_tensors)
        self.events.append("update")
        self.calls.append(([n for n, _ in named], version, flush))
        self.inner.update_weights_from_tensors(named, version, flush)


def test_multi_bucket_push_flushes_only_after_the_last_bucket():
    model = learner_model(1)
    engine = RecordingEngine(LocalEngine.from_arch(ARCH, init_seed=2))
    bucket_bytes = 20 * 1024
    sync = make_sync(model, engine, bucket_bytes=bucket_bytes)
    result = sync.sync(1)
    names = [n for call in engine.calls for n in call[0]]
    assert names == list(model.state_dict())  # every tensor once, in export order
    assert [flush for *_, flush in engine.calls] == [False] * (len(engine.calls) - 1) + [True]
    assert {version for _, version, _ in engine.calls} == {1}
    assert engine.events[0] == "onload"  # a colocated engine takes its memory back before the push
    assert result.num_buckets == len(engine.calls) > 2
    sizes = {n: t.numel() * t.element_size() for n, t in model.state_dict().items()}
    for call_names, *_ in engine.calls:  # a bucket exceeds the limit only as a lone big tensor
        assert sum(sizes[n] for n in call_names) <= bucket_bytes or len(call_names) == 1
    assert_same_weights(engine.inner, model)
    assert result.parity.mean_abs_diff < 1e-5


@pytest.mark.parametrize("bad, match", [
    (("model.no_such.weight", torch.ones(4)), "is not a tensor of the learner's qwen3 architecture"),
    (("model.layers.9.self_attn.q_proj.weight", torch.ones(32, 32)), "is not a tensor of"),  # no layer 9
    (("model.norm.weight", torch.ones(7)), r"has shape \(7,\), expected \(32,\)"),
    (("model.embed_tokens.weight", torch.ones(256, 32)), r"expected \(128, 32\)"),  # megatron's padded vocab
    (("model.norm.weight", torch.ones(32, dtype=torch.int64)), "dtype torch.int64"),
    (("model.layers.0.mlp.down_proj.weight_scale_inv", torch.ones(1, 1, dtype=torch.bfloat16)), "float32 matrix"),
])
def test_a_malformed_bucket_is_refused_before_the_engine_sees_it(bad, match):
    """Names, shapes and dtypes the learner's architecture does not have: the real SGLang server
    exits on some (tensor route) and skips others while reporting the new version."""
    model = learner_model(1)
    engine = RecordingEngine(LocalEngine.from_arch(ARCH, init_seed=2))
    named = [bad, *model.state_dict().items()]  # the bad tensor is in the first bucket
    sync = WeightSync(None, ONE_RANK, ARCH, engine, SyncConfig(parity_every=0),
                      exporter=StateDictExporter(named, 1 << 20))
    with pytest.raises(ValueError, match=match) as info:
        sync.sync(1)
    assert "weight bucket 0, tensor " + repr(bad[0]) in str(info.value)
    assert engine.calls == [] and engine.weight_version == 0  # nothing was sent


def test_bucket_rules_accept_other_float_dtypes_and_block_fp8_scales_and_refuse_duplicates():
    from megatron_s2lpo.sync.bucket_rules import BucketRules

    rules = BucketRules.from_arch(ARCH)
    weights = learner_model(1).state_dict()
    rules.check([(n, t.to(torch.bfloat16)) for n, t in weights.items()])  # a bf16 learner into an fp32 server
    rules.check([("model.layers.0.mlp.down_proj.weight", weights["model.layers.0.mlp.down_proj.weight"]
                  .to(torch.float8_e4m3fn)), ("model.layers.0.mlp.down_proj.weight_scale_inv", torch.ones(1, 1))])
    with pytest.raises(ValueError, match="not a tensor of"):  # a norm has no block scales
        rules.check([("model.norm.weight_scale_inv", torch.ones(1, 1))])
    with pytest.raises(ValueError, match="weight bucket 3, tensor 'model.norm.weight' appears twice"):
        rules.check([("model.norm.weight", weights["model.norm.weight"])] * 2, 3)
    with pytest.raises(ValueError, match="bucket 0 is empty"):
        rules.check([])


def test_parity_runs_every_n_syncs():
    model, engine = learner_model(1), LocalEngine.from_arch(ARCH, init_seed=2)
    sync = make_sync(model, engine, parity_every=2)
    assert sync.sync(1).parity is None
    assert sync.sync(2).parity is not None
    assert sync.sync(3).parity is None


def test_construction_errors():
    model = learner_model(1)
    with pytest.raises(ValueError, match="needs the rollout engine"):
        make_sync(model, None)
    with pytest.raises(ValueError, match="sync.parity_every=1 needs the learner"):
        WeightSync(None, ONE_RANK, ARCH, LocalEngine.from_arch(ARCH), SyncConfig(),
                   exporter=StateDictExporter(model.state_dict(), 1 << 20))
    with pytest.raises(ValueError, match="sync.transport='distributed' needs an SGLang server"):
        make_sync(model, LocalEngine.from_arch(ARCH), transport="distributed")
    with pytest.raises(ValueError, match="unknown weight-sync transport 'rdma'"):
        WeightSync(None, ONE_RANK, ARCH, LocalEngine.from_arch(ARCH), SyncConfig(parity_every=0),
                   transport="rdma", exporter=StateDictExporter(model.state_dict(), 1 << 20))


def test_import_is_light():
    import subprocess
    import sys

    code = ("import sys, megatron_s2lpo.sync as s; heavy = [m for m in ('torch', 'megatron.core', 'transformers') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
