"""SGLangEngine as a replica pool, against protocol-server replicas over real HTTP on 127.0.0.1.

Dispatch (fewest requests in flight), a replica killed mid-step (nothing lost, nothing
duplicated), weight updates while another thread generates (abort-mode pause, resubmission, one
weight version per completion), and the errors that name a replica: a URL that is down, two
replicas on one port, a TP size the update group does not expect (replicas serving different
models fail the rotating parity check: test_sync_transports.py).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from megatron_s2lpo.config.rollout import EngineConfig
from megatron_s2lpo.config.sync import SyncConfig
from megatron_s2lpo.rollout.engine import GenerateRequest
from megatron_s2lpo.rollout.sglang_engine import SGLangEngine
from megatron_s2lpo.rollout.sglang_server import ServerProcess, build_launch_command
from megatron_s2lpo.utils.ports import free_ports

SERVER = [sys.executable, str(Path(__file__).resolve().parents[1] / "protocol_server.py")]
pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("one_thread")]


def state(url: str) -> dict:
    with urllib.request.urlopen(url + "/_test/state", timeout=30) as resp:
        return json.loads(resp.read())


def noop_pool(n: int, tmp_path, *, delay_s: float = 0.5, **kwargs) -> SGLangEngine:
    cfg = EngineConfig(backend="sglang", model_path="unused", replicas=n, ports=free_ports(n), launch_command=SERVER,
                       extra_args=["--noop", "--delay-s", str(delay_s)], startup_timeout_s=90, **kwargs)
    return SGLangEngine(cfg, name="learner", log_dir=str(tmp_path / "logs"), backoff_s=0.05)


def requests(n: int, tag: str = "r") -> list[GenerateRequest]:
    return [GenerateRequest(request_id=f"{tag}{i}", prompt_ids=[1, 2, 3], max_new_tokens=4, seed=i) for i in range(n)]


def completed(engine: SGLangEngine) -> Counter:
    """How often each request id was answered with a finished completion, over every replica."""
    return Counter(rid.split("~r")[0] for url in engine.urls for rid in state(url)["completed"])


def test_requests_spread_over_the_replicas_and_logs_belong_to_the_run(tmp_path):
    engine = noop_pool(3, tmp_path, delay_s=0.2)
    try:
        out = engine.generate(requests(30))
        assert [c.request_id for c in out] == [f"r{i}" for i in range(30)]
        assert [len(state(url)["completed"]) for url in engine.urls] == [10, 10, 10]  # fewest in flight
        assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == [f"learner-{i}.log" for i in range(3)]
        seeds = [state(url)["pid"] for url in engine.urls]
        assert len(set(seeds)) == 3
    finally:
        engine.close()
    assert (tmp_path / "logs" / "learner-0.log").is_file()  # a run's logs stay


def test_a_replica_killed_mid_step_loses_and_duplicates_nothing(tmp_path):
    engine = noop_pool(2, tmp_path, delay_s=1.0, max_restarts=1)
    try:
        out: list = []
        worker = threading.Thread(target=lambda: out.extend(engine.generate(requests(12, "k"))))
        worker.start()
        deadline = time.monotonic() + 60
        while sum(state(url)["num_generate"] for url in engine.urls) < 12:  # all in flight
            assert time.monotonic() < deadline
            time.sleep(0.05)
        victim = engine.replicas[1].process
        os.kill(victim.pid, signal.SIGKILL)
        worker.join(120)
        assert not worker.is_alive()
        assert [c.request_id for c in out] == [f"k{i}" for i in range(12)]
        assert all(len(c.token_ids) == len(c.logprobs) == 4 for c in out)
        # every request finished exactly once (the killed replica's restart forgot what it had served)
        assert completed(engine) == Counter({f"k{i}": 1 for i in range(12)})
        assert engine.replicas[1].restarts == 1 and engine.replicas[0].restarts == 0
    finally:
        engine.close()


def test_weights_change_while_another_thread_generates(tmp_path):
    """The pipelined loop's case: pause (abort), update every replica, continue; nothing lost,
    nothing duplicated, every completion from ONE version."""
    engine = noop_pool(2, tmp_path, delay_s=0.6)
    try:
        out: list = []
        worker = threading.Thread(target=lambda: out.extend(engine.generate(requests(16, "p"))))
        worker.start()
        while sum(len(state(url)["inflight"]) for url in engine.urls) < 16:
            time.sleep(0.02)
        engine.update_weights_from_disk("/weights/step-1", version=1)  # pauses every replica itself
        worker.join(60)
        assert [c.request_id for c in out] == [f"p{i}" for i in range(16)]
        assert {c.weight_version for c in out} == {1}  # all were aborted by the pause and rerun on v1
        assert sum(state(url)["num_aborted"] for url in engine.urls) == 16
        assert completed(engine) == Counter({f"p{i}": 1 for i in range(16)})
        assert all(state(url)["weight_version"] == "1" and not state(url)["paused"] for url in engine.urls)
    finally:
        engine.close()


def test_errors_name_the_replica(tmp_path):
    up, down = free_ports(2)
    server = ServerProcess(build_launch_command(EngineConfig(backend="sglang", model_path="m", port=up,
                                                             launch_command=SERVER, extra_args=["--noop"])),
                           log_path=str(tmp_path / "up.log"))
    server.start()
    try:
        with pytest.raises(TimeoutError, match=rf"replica learner\[1\] at http://127.0.0.1:{down}: server at "
                                               rf"http://127.0.0.1:{down} was not healthy within 2 s"):
            SGLangEngine(EngineConfig(backend="sglang", urls=[f"http://127.0.0.1:{up}", f"http://127.0.0.1:{down}"],
                                      startup_timeout_s=2.0), name="learner")
    finally:
        server.stop()
    with pytest.raises(ValueError, match="engine replicas 0 and 1 share port 30005"):
        EngineConfig(backend="sglang", model_path="m", replicas=2, ports=[30005, 30005])
    with pytest.raises(ValueError, match="engine replicas 0 and 1 share url http://h:1"):
        EngineConfig(backend="sglang", urls=["http://h:1", "http://h:1/"])


def test_a_replica_with_another_tp_size_than_the_update_group_expects(tmp_path):
    from megatron_s2lpo.sync.base import TransportContext
    from megatron_s2lpo.sync.transports import DistributedTransport

    ports = free_ports(2)
    procs = [ServerProcess(SERVER + ["--noop", "--port", str(p), "--tp-size", str(tp)], log_path=str(tmp_path / f"{p}"))
             for p, tp in zip(ports, (1, 2))]
    for proc in procs:
        proc.start()
    try:
        engine = SGLangEngine(EngineConfig(backend="sglang", urls=[f"http://127.0.0.1:{p}" for p in ports],
                                           startup_timeout_s=60), name="learner")
        try:
            with pytest.raises(ValueError, match=rf"replica learner\[1\] at http://127.0.0.1:{ports[1]} runs "
                                                 r"tp_size=2, but the update group gives every replica "
                                                 r"rollout.learner.tp_size=1 ranks"):
                DistributedTransport(engine, SyncConfig(group_backend="gloo", master_address="127.0.0.1"),
                                     TransportContext(arch=None))
        finally:
            engine.close()
    finally:
        for proc in procs:
            proc.stop()


@pytest.mark.timeout(60)
def test_a_request_fails_in_bounded_time_when_the_only_attached_server_is_gone(tmp_path):
    """Attached servers are never restarted: with every replica down, generation fails after
    unavailable_timeout_s naming the replica (it used to wait forever). Checked on the real
    server in tests/real_sglang/test_faults_real.py."""
    port = free_ports(1)[0]
    server = ServerProcess(SERVER + ["--noop", "--port", str(port)], log_path=str(tmp_path / "server.log"))
    server.start()
    engine = None
    try:
        engine = SGLangEngine(EngineConfig(backend="sglang", url=f"http://127.0.0.1:{port}", startup_timeout_s=60,
                                           unavailable_timeout_s=2.0, max_retries=1), name="only", backoff_s=0.05)
        engine.generate(requests(1, "up"))
        os.killpg(os.getpgid(server.pid), signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(Exception, match=rf"(?s)unavailable_timeout_s.*replica only\[0\] at http://127.0.0.1:{port}"):
            engine.generate(requests(2, "down"))
        assert time.monotonic() - start < 30
    finally:
        if engine is not None:
            engine.close()
        server.stop()


@pytest.mark.timeout(90)
def test_an_attached_replica_that_died_is_left_out_of_generation_and_of_the_parity_rotation(tmp_path):
    """Two attached servers, one killed: its requests go to the other, and the weight-parity check,
    which rotates over the replicas, samples a live one (it used to post to the dead server and
    fail the run's sync)."""
    ports = free_ports(2)
    servers = [ServerProcess(SERVER + ["--noop", "--port", str(p)], log_path=str(tmp_path / f"s{p}.log"))
               for p in ports]
    engine = None
    try:
        for server in servers:
            server.start()
        engine = SGLangEngine(EngineConfig(backend="sglang", urls=[f"http://127.0.0.1:{p}" for p in ports],
                                           startup_timeout_s=60, max_retries=2), name="two", backoff_s=0.05)
        assert [engine.replica_engine(i).name for i in range(2)] == ["two[0]", "two[1]"]
        os.killpg(os.getpgid(servers[1].pid), signal.SIGKILL)
        assert len(engine.generate(requests(8, "after"))) == 8  # replica 1's share rerouted
        assert not engine.replicas[1].live
        views = [engine.replica_engine(i) for i in range(2)]
        assert [v.name for v in views] == ["two[0]", "two[0]"]
        assert len(views[1].generate(requests(2, "parity"))) == 2
    finally:
        if engine is not None:
            engine.close()
        for server in servers:
            server.stop()
