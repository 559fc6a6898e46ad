"""Malformed weight payloads and real SGLang 0.5.23 servers: what would take a server down never
leaves the trainer, and what reaches the server is survived.

Measured on the real server (docs/sync.md, "Malformed buckets"): on the tensor route a tensor of
the wrong shape, a layer the model does not have, or bytes that do not match the bucket's
metadata make the scheduler raise and the WHOLE server exit, as do CPU tensors under torch's
default file_descriptor sharing; on every route a name the model does not know is skipped while
the update reports success and the new version, and an integer tensor is cast silently. The
sender refuses all of them (sync/bucket_rules.py, rollout/sglang_tensors.py::check_flattened);
the replica killed mid-step and the only attached server killed are in test_train_real.py.
"""

from __future__ import annotations

import pytest
import torch

from megatron_s2lpo.rollout import GenerateRequest, LocalEngine
from megatron_s2lpo.rollout import sglang_tensors
from megatron_s2lpo.sync.exporter import StateDictExporter

from test_sync_real import make_sync

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
MALFORMED = [
    ("model.norm.weight", torch.ones(7)),  # wrong shape: the tensor route's weight loader asserts
    ("model.layers.5.self_attn.q_proj.weight", torch.ones(32, 32)),  # a layer it does not have: KeyError
    ("model.no_such.weight", torch.ones(4)),  # skipped, yet the update reports the new version
    ("model.norm.weight", torch.ones(32, dtype=torch.int64)),  # cast into the float weight silently
]


@pytest.mark.parametrize("transport", ["tensor", "distributed", "disk"])
def test_a_malformed_bucket_never_reaches_a_real_server_and_a_bf16_one_is_loaded(fresh_learner_pool, model_dirs,
                                                                                  tok, tmp_path, transport):
    pool = fresh_learner_pool
    model = LocalEngine.from_pretrained(model_dirs["learner_alt"]).model
    with torch.no_grad():  # the learner's weights as bf16 holds them: the bf16 push below is exact
        for param in model.parameters():
            param.copy_(param.to(torch.bfloat16).float())
    sync = make_sync(pool, model, tmp_path, transport)
    starts = [r.num_starts for r in pool.replicas]
    try:
        for bad in MALFORMED:
            sync.exporter = StateDictExporter([bad, *model.state_dict().items()], 16 * 1024)
            with pytest.raises(ValueError, match=f"weight bucket 0, tensor '{bad[0]}'"):
                sync.sync(1)
            assert pool.replica_versions() == {"learner[0]": 0, "learner[1]": 0}  # both up, nothing loaded
        # what does reach the server: the same weights as bf16 tensors, cast into its fp32 weights
        sync.exporter = StateDictExporter({n: t.to(torch.bfloat16) for n, t in model.state_dict().items()},
                                          16 * 1024)
        for version in (1, 2):  # parity rotates over both replicas
            result = sync.sync(version)
            assert result.parity.mean_abs_diff < 1e-4, result.parity
            assert pool.replica_versions() == {"learner[0]": version, "learner[1]": version}
    finally:
        sync.close()
    assert all(r.process.alive() for r in pool.replicas) and [r.num_starts for r in pool.replicas] == starts
    assert len(pool.generate([GenerateRequest(request_id=f"after-{i}", prompt_ids=tok.encode("1+2="),
                                              max_new_tokens=4) for i in range(4)])) == 4


def test_the_sender_never_uses_the_sharing_strategy_that_kills_the_server():
    """CPU tensors under torch's default file_descriptor strategy make SGLang 0.5.23's scheduler
    raise in rebuild_storage_fd and the whole server exit: the serializer refuses them."""
    flat, metadata = sglang_tensors.pack_bucket([("w", torch.ones(4))])
    with pytest.raises(ValueError):
        sglang_tensors.serialize_per_rank(flat, metadata, 1)
    with pytest.raises(ValueError):
        sglang_tensors.serialize_per_rank(flat, metadata, 1, cpu_sharing="file_descriptor")
    assert len(sglang_tensors.serialize_per_rank(flat, metadata, 2, cpu_sharing="file_system")) == 2
