"""Faults on real SGLang 0.5.23 servers: a replica killed mid-generation, the only attached server
killed, and the tensor payload that kills a server, which the sender never produces."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from megatron_s2lpo.rollout import GenerateRequest, LocalEngine, SGLangEngine
from megatron_s2lpo.rollout import sglang_tensors
from megatron_s2lpo.rollout.sglang_client import EngineRequestError

from conftest import real_engine_config
from test_real_server import teacher_forced

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def requests(tok, prefix: str, num: int, max_new_tokens: int = 24) -> list[GenerateRequest]:
    return [GenerateRequest(request_id=f"{prefix}-{i}", prompt_ids=tok.encode(f"{i % 10}+{i % 7}="),
                            temperature=1.0, max_new_tokens=max_new_tokens) for i in range(num)]


def kill_group(process) -> None:
    """SIGKILL a launched server and its scheduler / detokenizer children (its process group)."""
    os.killpg(os.getpgid(process.pid), signal.SIGKILL)


def test_a_replica_killed_mid_generation_is_restarted_and_every_request_answered_once(
        fresh_learner_pool, model_dirs, tok):
    pool = fresh_learner_pool
    reference = LocalEngine.from_pretrained(model_dirs["learner"]).model
    reqs = requests(tok, "kill", 48)
    out: dict = {}
    worker = threading.Thread(target=lambda: out.update(comps=pool.generate(reqs)))
    restarts = pool.replicas[1].restarts
    worker.start()
    time.sleep(0.5)  # requests are in flight on both replicas
    kill_group(pool.replicas[1].process)
    worker.join(timeout=600)
    assert not worker.is_alive()
    comps = out["comps"]
    assert [c.request_id for c in comps] == [r.request_id for r in reqs]  # each answered once, in order
    for req, comp in zip(reqs, comps, strict=True):
        assert comp.weight_version == 0 and comp.token_ids
        ref = teacher_forced(reference, comp, req.temperature)  # the same weights answered, also after
        assert max(abs(a - b) for a, b in zip(ref, comp.logprobs, strict=True)) < 1e-4
    pool.generate(requests(tok, "after", 4))  # a restart may still be under way: it completes here
    assert pool.replicas[1].restarts == restarts + 1 and pool.replicas[1].live
    assert pool.replica_versions() == {"learner[0]": 0, "learner[1]": 0}  # its disk weights replayed


def test_the_only_attached_server_killed_is_an_error_in_bounded_time(fresh_learner_pool, tok):
    """Nothing can restart an attached server: generation fails after unavailable_timeout_s,
    naming the server and what to do, instead of waiting forever."""
    pool = fresh_learner_pool
    attached = SGLangEngine(real_engine_config(url=pool.urls[1], unavailable_timeout_s=5.0, max_retries=1),
                            name="only", backoff_s=0.1)
    try:
        assert attached.generate(requests(tok, "alive", 2, 4))[0].weight_version == 0
        kill_group(pool.replicas[1].process)
        start = time.monotonic()
        with pytest.raises(EngineRequestError) as info:
            attached.generate(requests(tok, "dead", 2, 4))
        assert time.monotonic() - start < 120
    finally:
        attached.close()
    message = str(info.value)
    assert f"replica only[0] at {pool.urls[1]}" in message and "unavailable_timeout_s" in message
    assert "restart the attached server" in message
    pool.generate(requests(tok, "heal", 4, 4))  # the launched pool restarts its replica
    assert pool.replica_versions() == {"learner[0]": 0, "learner[1]": 0}


def test_the_sender_never_uses_the_sharing_strategy_that_kills_the_server():
    """CPU tensors under torch's default file_descriptor strategy make SGLang 0.5.23's scheduler
    raise in rebuild_storage_fd and the whole server exit: the serializer refuses them."""
    flat, metadata = sglang_tensors.pack_bucket([("w", torch.ones(4))])
    with pytest.raises(ValueError):
        sglang_tensors.serialize_per_rank(flat, metadata, 1)
    with pytest.raises(ValueError):
        sglang_tensors.serialize_per_rank(flat, metadata, 1, cpu_sharing="file_descriptor")
    assert len(sglang_tensors.serialize_per_rank(flat, metadata, 2, cpu_sharing="file_system")) == 2
