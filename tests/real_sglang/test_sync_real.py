"""Every weight-sync transport into real SGLang 0.5.23 servers: 1 replica (attached) and 2 (launched).

The learner is a transformers model holding other weights than the servers (`learner_alt`); after
each push every replica must report the pushed version and the parity check (rotating over the
replicas) must find the learner's log-probs in the server's answers. Each test resets the servers
to their initial weights and version 0 afterwards (a disk update), so the pool is shared.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_s2lpo.config.sync import SyncConfig
from megatron_s2lpo.rollout import LocalEngine, SGLangEngine
from megatron_s2lpo.sync.exporter import StateDictExporter
from megatron_s2lpo.sync.transports import TensorTransport, TransportContext
from megatron_s2lpo.sync.weight_sync import WeightSync

from conftest import real_engine_config, tiny_arch

pytestmark = pytest.mark.slow
ONE_RANK = SimpleNamespace(rank=0, world_size=1, dp_rank=0)


class HFLearner:
    """`compute_logprobs` of a transformers model, row by row, float64 softmax (the parity learner)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    @torch.no_grad()
    def compute_logprobs(self, batch, temperature: float = 1.0) -> torch.Tensor:
        out = torch.zeros(batch.tokens.shape)
        for b in range(batch.num_seqs):
            tokens = batch.tokens[b, :int(batch.seq_lens[b])]
            logp = torch.log_softmax(self.model(input_ids=tokens[None]).logits[0].double() / temperature, dim=-1)
            for t in range(1, len(tokens)):
                out[b, t] = logp[t - 1, tokens[t]]
        return out


@pytest.fixture(scope="module")
def one_replica(learner_pool):
    """A one-replica engine attached to the pool's replica 0 (a real server launched by the pool)."""
    engine = SGLangEngine(real_engine_config(url=learner_pool.urls[0]), name="attached")
    yield engine
    engine.close()


@pytest.fixture
def pools(learner_pool, one_replica, model_dirs):
    """{1: the attached engine, 2: the launched pool}; servers reset to version 0 afterwards."""
    yield {1: one_replica, 2: learner_pool}
    learner_pool.update_weights_from_disk(model_dirs["learner"], 0)
    one_replica._version = one_replica.replicas[0].version = 0  # the attached view of replica 0
    assert learner_pool.replica_versions() == {"learner[0]": 0, "learner[1]": 0}


def make_sync(engine, model, tmp_path, transport: str) -> WeightSync:
    arch = tiny_arch(model.config.vocab_size)
    cfg = SyncConfig(transport="disk" if transport == "tensor" else transport, disk_dir=str(tmp_path / "sync"),
                     group_backend="gloo", master_address="127.0.0.1", group_timeout_s=60, parity_every=1,
                     parity_num_sequences=3, parity_max_new_tokens=6, parity_threshold=1e-4)
    sync = WeightSync(None, ONE_RANK, arch, engine, cfg, learner=HFLearner(model), temperature=0.8,
                      exporter=StateDictExporter(model.state_dict(), 16 * 1024))
    if transport == "tensor":
        # WeightSync refuses the tensor route without CUDA (CUDA IPC handles); on CPU the same
        # transport moves the tensors as shared-memory files (file_system sharing strategy),
        # the only strategy whose payload the real server survives (test_faults_real.py).
        sync._transport.close()
        sync._transport = TensorTransport(engine, cfg, TransportContext(arch=arch), check_environment=False,
                                          cpu_sharing="file_system")
        sync.transport_name = "tensor"
    return sync


@pytest.mark.parametrize("num_replicas", [1, 2])
@pytest.mark.parametrize("transport", ["disk", "distributed", "tensor"])
def test_transport_into_real_servers_with_versions_and_parity(pools, model_dirs, tmp_path, transport, num_replicas):
    engine = pools[num_replicas]
    model = LocalEngine.from_pretrained(model_dirs["learner_alt"]).model
    sync = make_sync(engine, model, tmp_path, transport)
    names = [r.name for r in engine.replicas]
    try:
        for version in (1, 2):  # two pushes: parity rotates over both replicas of the pool
            result = sync.sync(version)
            assert result.transport == transport and result.num_bytes > 0
            assert engine.replica_versions() == {name: version for name in names}
            assert result.parity.mean_abs_diff < 1e-4, result.parity
            assert names[(version - 1) % len(names)] in result.parity.engine
        with torch.no_grad():  # a changed learner is what the next push carries
            model.model.norm.weight.mul_(1.5)
        sync.exporter = StateDictExporter(model.state_dict(), 16 * 1024)
        assert sync.sync(3).parity.mean_abs_diff < 1e-4
    finally:
        sync.close()


def test_tensor_push_refused_on_cpu_without_the_file_system_strategy(pools, model_dirs, tmp_path):
    """WeightSync on a machine without CUDA refuses the tensor route and says what to use."""
    model = LocalEngine.from_pretrained(model_dirs["learner_alt"]).model
    cfg = SyncConfig(transport="tensor", disk_dir=str(tmp_path), parity_every=0)
    with pytest.raises((ValueError, RuntimeError), match="sync.transport=disk"):
        WeightSync(None, ONE_RANK, tiny_arch(model.config.vocab_size), pools[2], cfg,
                   exporter=StateDictExporter(model.state_dict(), 1 << 20))
    with pytest.raises((NotImplementedError, ValueError), match="disk"):
        pools[2].update_weights_from_tensors([("model.norm.weight", torch.ones(32))], 1)
    assert pools[2].replica_versions() == {"learner[0]": 0, "learner[1]": 0}  # nothing was pushed
