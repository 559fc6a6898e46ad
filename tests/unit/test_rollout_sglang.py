"""SGLangEngine against the SGLang-protocol test server over real HTTP on 127.0.0.1 (one replica;
replica pools: test_rollout_pool.py)."""

import asyncio
import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from megatron_s2lpo.config.model import ModelArch
from megatron_s2lpo.config.rollout import EngineConfig
from megatron_s2lpo.rollout.engine import GenerateRequest
from megatron_s2lpo.rollout.local import LocalEngine
from megatron_s2lpo.rollout.sglang_client import EngineRequestError
from megatron_s2lpo.rollout.sglang_engine import SGLangEngine
from megatron_s2lpo.utils.ports import free_port

SERVER = [sys.executable, str(Path(__file__).resolve().parents[1] / "protocol_server.py")]
KEY = "test-key"
pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("one_thread")]


def admin(url: str, path: str, body: dict | None = None, key: str = KEY):
    """A raw HTTP call (no retries) to the test server's own routes."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read() or b"null")




@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tok):
    arch = ModelArch(family="qwen3", vocab_size=len(tok), hidden_size=32, ffn_hidden_size=64,
                     num_layers=2, num_attention_heads=4, num_query_groups=2, head_dim=8,
                     qk_layernorm=True)
    dirs = []
    for seed in (0, 1):
        path = str(tmp_path_factory.mktemp(f"model{seed}"))
        LocalEngine.from_arch(arch, tokenizer=tok, init_seed=seed).save_pretrained(path)
        dirs.append(path)
    return dirs


def engine_config(model_path: str, **kwargs) -> EngineConfig:
    kwargs.setdefault("max_retries", 2)
    return EngineConfig(backend="sglang", model_path=model_path, port=free_port(),
                        launch_command=SERVER, startup_timeout_s=90, request_timeout_s=60, **kwargs)


@pytest.fixture(scope="module")
def server(model_dirs, tmp_path_factory):
    log = str(tmp_path_factory.mktemp("logs") / "server.log")
    engine = SGLangEngine(engine_config(model_dirs[0], api_key=KEY, deterministic=True), backoff_s=0.05, log_path=log)
    yield engine
    engine.close()


def teacher_forced(model, comp, temperature) -> list[float]:
    ids = torch.tensor([comp.prompt_ids + comp.token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double() / temperature, dim=-1)
    start = len(comp.prompt_ids) - 1
    return [logp[start + i, t].item() for i, t in enumerate(comp.token_ids)]


def test_generate_logprobs_match_the_servers_model(server, model_dirs, tok):
    local = LocalEngine.from_pretrained(model_dirs[0])
    reqs = [GenerateRequest(request_id=f"q{i}", prompt_ids=tok.encode(p), temperature=t,
                            top_p=0.9, max_new_tokens=20, seed=i)
            for i, (p, t) in enumerate([("1+2=", 0.7), ("What is 6*7? ", 1.3), ("9", 0.7)] * 3)]
    comps = server.generate(reqs)
    assert [c.request_id for c in comps] == [r.request_id for r in reqs]
    for req, comp in zip(reqs, comps, strict=True):
        assert comp.prompt_ids == req.prompt_ids and comp.weight_version == 0
        ref = teacher_forced(local.model, comp, req.temperature)
        assert max(abs(a - b) for a, b in zip(ref, comp.logprobs, strict=True)) < 1e-5
    # One request alone is one batch on both sides: same sampler, same seed, same tokens.
    (alone,) = server.generate(reqs[:1])
    assert alone.token_ids == local.generate(reqs[:1])[0].token_ids
    assert alone.text == tok.decode(alone.token_ids, skip_special_tokens=True)


def test_agenerate_from_another_event_loop(server, tok):
    reqs = [GenerateRequest(request_id=f"a{i}", prompt_ids=tok.encode("ab"), max_new_tokens=4)
            for i in range(3)]
    comps = asyncio.run(server.agenerate(reqs))
    assert [c.request_id for c in comps] == ["a0", "a1", "a2"]


def test_error_after_the_retry_budget_names_url_request_and_answer(server, tok):
    before = admin(server.url, "/_test/state")["num_failed"]
    admin(server.url, "/_test/faults", {"fail_next": 100, "status": 503})
    try:
        with pytest.raises(EngineRequestError) as info:
            server.generate([GenerateRequest(request_id="doomed-7", prompt_ids=tok.encode("x"))])
    finally:
        admin(server.url, "/_test/faults", {"fail_next": 0})
    message = str(info.value)
    assert f"{server.url}/generate" in message and "doomed-7" in message
    assert "HTTP 503" in message and "injected failure" in message and "3 attempt(s)" in message
    assert admin(server.url, "/_test/state")["num_failed"] - before == 3  # 1 try + 2 retries


def test_a_truncated_body_is_retried_then_fails_naming_url_and_request(server, tok):
    admin(server.url, "/_test/faults", {"truncate_next": 1})
    (ok,) = server.generate([GenerateRequest(request_id="cut-1", prompt_ids=tok.encode("1"), max_new_tokens=2)])
    assert ok.request_id == "cut-1" and len(ok.token_ids) == 2  # the retry had a fresh rid and a whole body
    assert admin(server.url, "/_test/state")["completed"][-2:] == ["cut-1", "cut-1~r1"]
    admin(server.url, "/_test/faults", {"truncate_next": 100})
    try:
        with pytest.raises(EngineRequestError) as info:
            server.generate([GenerateRequest(request_id="cut-2", prompt_ids=tok.encode("1"), max_new_tokens=2)])
    finally:
        admin(server.url, "/_test/faults", {"truncate_next": 0})
    message = str(info.value)
    assert f"{server.url}/generate" in message and "request cut-2" in message and "rid cut-2~r2" in message
    assert "truncated or non-JSON body" in message and "3 attempt(s)" in message


def test_client_errors_are_not_retried(server):
    before = admin(server.url, "/_test/state")["num_generate"]
    with pytest.raises(EngineRequestError, match="request oov.*HTTP 400.*out of vocabulary"):
        server.generate([GenerateRequest(request_id="oov", prompt_ids=[5, 99999])])
    assert admin(server.url, "/_test/state")["num_generate"] - before == 1


def test_api_key_guards_everything_but_health(server):
    with pytest.raises(urllib.error.HTTPError) as info:
        admin(server.url, "/get_model_info", key="wrong")
    assert info.value.code == 401
    info.value.close()
    with urllib.request.urlopen(server.url + "/health", timeout=10) as resp:
        assert resp.status == 200
    assert server.health() and server.health_generate()


def test_update_weights_from_disk_over_http(server, model_dirs, tok):
    req = [GenerateRequest(request_id="w", prompt_ids=tok.encode("4*4="), temperature=0.8,
                           max_new_tokens=16, seed=42)]
    before = server.generate(req)[0]
    server.update_weights_from_disk(model_dirs[1], version=7)
    try:
        after = server.generate(req)[0]
        assert server.weight_version == 7 and after.weight_version == 7
        assert server.get_model_info()["weight_version"] == "7"
        # (Random tiny models are near uniform: the same seed may pick the same tokens, but
        # their log-probs now come from the second model and no longer from the first.)
        new_model = LocalEngine.from_pretrained(model_dirs[1]).model
        ref = teacher_forced(new_model, after, 0.8)
        assert max(abs(a - b) for a, b in zip(ref, after.logprobs, strict=True)) < 1e-5
        assert max(abs(a - b) for a, b in zip(before.logprobs, after.logprobs, strict=True)) > 1e-3
        with pytest.raises(EngineRequestError, match="HTTP 400.*no-such-dir"):
            server.update_weights_from_disk("/no-such-dir", version=9)
        assert server.weight_version == 7
    finally:
        server.update_weights_from_disk(model_dirs[0], version=8)
    restored = server.generate(req)[0]
    assert restored.token_ids == before.token_ids and restored.weight_version == 8
    assert restored.logprobs == pytest.approx(before.logprobs, abs=1e-6)


def test_offload_releases_memory_only_with_the_memory_saver(server, model_dirs, tok, tmp_path):
    req = [GenerateRequest(request_id="o1", prompt_ids=tok.encode("1+1="), max_new_tokens=3, seed=1)]
    server.offload()  # a server on its own GPUs (no memory saver) keeps its memory
    assert admin(server.url, "/_test/state")["released"] == []
    colocated = SGLangEngine(engine_config(model_dirs[0], enable_memory_saver=True), backoff_s=0.05,
                             log_path=str(tmp_path / "colocated.log"))
    try:
        colocated.offload()
        colocated.offload()  # once released, stays released (no second call to the server)
        assert admin(colocated.url, "/_test/state")["released"] == ["kv_cache", "weights"]
        colocated.onload()
        assert admin(colocated.url, "/_test/state")["released"] == []
        colocated.offload()
        assert colocated.generate(req)[0].token_ids  # generating takes the memory back first
        assert admin(colocated.url, "/_test/state")["released"] == []
    finally:
        colocated.close()


def test_control_endpoints(server, tok):
    assert "Cache flushed" in server.flush_cache()
    assert server.get_model_info()["is_generation"] is True
    server.release_memory_occupation(["kv_cache"])
    assert admin(server.url, "/_test/state")["released"] == ["kv_cache"]
    server.resume_memory_occupation(["kv_cache"])
    assert admin(server.url, "/_test/state")["released"] == []
    assert admin(server.url, "/_test/state")["num_deprecated"] == 0  # /model_info, never /get_model_info

    server.pause_generation()
    assert admin(server.url, "/_test/state")["paused"]
    out = []
    worker = threading.Thread(target=lambda: out.extend(server.generate(
        [GenerateRequest(request_id="paused", prompt_ids=tok.encode("p"), max_new_tokens=3)])))
    worker.start()
    time.sleep(0.5)
    assert not out  # held while paused
    server.continue_generation()
    worker.join(30)
    assert [c.request_id for c in out] == ["paused"] and not admin(server.url, "/_test/state")["paused"]

    with pytest.raises(NotImplementedError, match="CUDA IPC"):
        server.update_weights_from_tensors([("model.norm.weight", torch.ones(32))], version=1)
    assert not admin(server.url, "/_test/state")["session_open"]  # refused before any session opened


def test_a_hung_request_is_aborted_and_resubmitted_after_a_restart(tok, tmp_path):
    cfg = engine_config("unused", extra_args=["--noop"], hang_timeout_s=1.5, max_restarts=1)
    engine = SGLangEngine(cfg, backoff_s=0.05, log_path=str(tmp_path / "server.log"))
    try:
        old_pid = engine.process.pid
        admin(engine.url, "/_test/faults", {"hang_next": 1}, key="")
        start = time.monotonic()
        (comp,) = engine.generate([GenerateRequest(request_id="h", prompt_ids=[1, 2], max_new_tokens=4)])
        assert time.monotonic() - start < 30  # the deadline, a restart, an answer: not 4 x the timeout
        assert comp.request_id == "h" and len(comp.token_ids) == 4
        assert engine.num_restarts == 1 and engine.process.pid != old_pid
        assert admin(engine.url, "/_test/state", key="")["completed"] == ["h~r1"]  # a fresh rid
    finally:
        engine.close()


def test_sigkilled_server_is_restarted_and_every_request_answered_once(tok, tmp_path):
    # A model-free server (fast restarts); answers echo the request id, which the client checks.
    cfg = engine_config("unused", extra_args=["--noop", "--delay-s", "1.0"], max_retries=3,
                        max_restarts=2)
    engine = SGLangEngine(cfg, backoff_s=0.05, log_path=str(tmp_path / "server.log"))
    try:
        reqs = [GenerateRequest(request_id=f"k{i}", prompt_ids=tok.encode(f"{i}+1="), max_new_tokens=8,
                                seed=i) for i in range(12)]
        out: list = []
        worker = threading.Thread(target=lambda: out.extend(engine.generate(reqs)))
        worker.start()
        deadline = time.monotonic() + 60
        while admin(engine.url, "/_test/state")["num_generate"] < len(reqs):  # all in flight
            assert time.monotonic() < deadline
            time.sleep(0.05)
        old_pid = engine.process.pid
        os.kill(old_pid, signal.SIGKILL)
        worker.join(120)
        assert not worker.is_alive()
        assert [c.request_id for c in out] == [r.request_id for r in reqs]
        assert all(len(c.token_ids) == len(c.logprobs) > 0 for c in out)
        assert engine.num_restarts == 1 and engine.process.pid != old_pid
        # The new server saw each request exactly once, under a fresh rid: resubmitted, never duplicated.
        assert sorted(admin(engine.url, "/_test/state")["completed"]) == sorted(f"k{i}~r1" for i in range(12))

        # Weights that came as tensors die with the server: the restarted replica reports its
        # initial version, so the engine refuses to generate until the next weight sync.
        engine.replicas[0].last_disk_update = None
        engine._version = engine.replicas[0].version = 4
        kill_and_reap(engine)
        for _ in range(2):
            with pytest.raises(EngineRequestError, match="serves other weights than version 4.*sync the weights"):
                engine.generate(reqs[:1])
        engine.update_weights_from_disk("/weights/step-5", version=5)
        assert engine.generate(reqs[:1])[0].weight_version == 5

        kill_and_reap(engine)  # the restart budget (2) is spent now
        with pytest.raises(EngineRequestError, match="exited .* already restarted 2 time"):
            engine.generate(reqs[:1])
    finally:
        engine.close()


def kill_and_reap(engine: SGLangEngine) -> None:
    os.kill(engine.process.pid, signal.SIGKILL)
    engine.process._proc.wait(30)


def test_server_that_exits_at_startup_reports_its_log(tmp_path):
    cfg = EngineConfig(backend="sglang", model_path="m", port=free_port(), startup_timeout_s=60,
                       launch_command=[sys.executable, "-c",
                                       "import sys; print('cannot load model', flush=True); sys.exit(3)"])
    with pytest.raises(RuntimeError, match="(?s)replica sglang.0. at .*exited with code 3.*cannot load model"):
        SGLangEngine(cfg, log_path=str(tmp_path / "server.log"))


def test_server_that_never_gets_healthy_times_out_with_its_log_and_temporary_logs_go(monkeypatch):
    from megatron_s2lpo.rollout import sglang_replica

    created = []  # this engine's own server processes (other workers create temporary logs too)

    class Recorded(sglang_replica.ServerProcess):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(self)

    monkeypatch.setattr(sglang_replica, "ServerProcess", Recorded)
    cfg = EngineConfig(backend="sglang", model_path="m", port=free_port(), startup_timeout_s=1.0,
                       launch_command=[sys.executable, "-c",
                                       "import time; print('still booting', flush=True); time.sleep(60)"])
    with pytest.raises(TimeoutError, match="(?s)not healthy within 1 s.*still booting"):
        SGLangEngine(cfg)
    (process,) = created
    assert process.temporary_log and os.path.basename(process.log_path).startswith("sglang-server-")
    assert not os.path.exists(process.log_path)  # removed on close


# ----- simulated decode time (--latency-ms-per-token) -----

def post_batch(url: str, rid: str, *, key: str = KEY) -> tuple[float, list[dict]]:
    """One /generate call of 4 greedy 16-token prompts (one server batch): (seconds, answers)."""
    body = {"input_ids": [[5 + i, 6, 7] for i in range(4)], "rid": rid, "return_logprob": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": 16}}
    start = time.monotonic()
    outs = admin(url, "/generate", body, key=key)
    return time.monotonic() - start, outs


def in_background(fn) -> tuple[threading.Thread, dict]:
    out: dict = {}
    worker = threading.Thread(target=lambda: out.update(zip(("seconds", "outs"), fn())))
    worker.start()
    return worker, out


def wait_decoding(url: str, num: int = 1) -> None:
    """Until the server holds `num` batches for their simulated decode time."""
    deadline = time.monotonic() + 30
    while admin(url, "/_test/state")["decoding"] != num:
        assert time.monotonic() < deadline, "the batch never reached its simulated decode"
        time.sleep(0.01)


def healthy(url: str) -> bool:
    with urllib.request.urlopen(url + "/health", timeout=5) as resp:
        return resp.status == 200


def test_latency_per_token_holds_a_batch_and_the_server_keeps_answering(server):
    url = server.url
    try:
        held = admin(url, "/_test/state")["num_held"]
        post_batch(url, "lat-base")
        assert admin(url, "/_test/state")["num_held"] == held  # without the option no batch is held
        # 150 ms x 16 tokens = 2.4 s, paused in place for 0.4 s mid-decode: the clock stops (SGLang
        # runs no batch while paused), so the answer comes no sooner than 2.4 s + the pause.
        admin(url, "/_test/faults", {"latency_ms_per_token": 150})
        worker, out = in_background(lambda: post_batch(url, "lat-slow"))
        wait_decoding(url)
        admin(url, "/pause_generation", {"mode": "in_place"})
        paused = time.monotonic()
        time.sleep(0.4)
        assert healthy(url) and len(admin(url, "/_test/state")["inflight"]) == 4
        admin(url, "/continue_generation", {})
        paused = time.monotonic() - paused
        worker.join(30)
        steps = max(o["meta_info"]["completion_tokens"] for o in out["outs"])
        assert steps == 16
        assert out["seconds"] >= 0.15 * steps + paused - 0.05, (out["seconds"], paused)  # a 10 ms tick per edge
        assert admin(url, "/_test/state")["num_held"] == held + 1

        # A decode of 16,000 s: the routes answer during it, an abort ends it.
        admin(url, "/_test/faults", {"latency_ms_per_token": 1e6})
        worker, out = in_background(lambda: post_batch(url, "lat-abort"))
        wait_decoding(url)
        assert healthy(url) and server.get_model_info()["is_generation"]
        admin(url, "/abort_request", {"abort_all": True})
        worker.join(30)
        assert not worker.is_alive()  # ended by the abort, not by the decode
        assert [o["meta_info"]["finish_reason"]["type"] for o in out["outs"]] == ["abort"] * 4
        wait_decoding(url, 0)  # every request aborted: the batch stops decoding
    finally:
        admin(url, "/continue_generation", {})
        admin(url, "/_test/faults", {"latency_ms_per_token": 0})


def test_latency_flag_in_noop_mode_in_process():
    """The command-line flag, and the model-free path, on the server app run in this process."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import protocol_server
    from aiohttp import web

    args, _ = protocol_server.parse_args(["--noop", "--latency-ms-per-token", "25"])  # 16 fixed tokens
    with pytest.raises(SystemExit):
        protocol_server.parse_args(["--noop", "--latency-ms-per-token", "-1"])
    box: dict = {}

    async def serve(ready: threading.Event, stop: asyncio.Event) -> None:
        runner = web.AppRunner(protocol_server.build_app(protocol_server.ServerState(args)))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        box["url"] = "http://127.0.0.1:%d" % runner.addresses[0][1]
        box["stop"], box["loop"] = stop, asyncio.get_running_loop()
        ready.set()
        await stop.wait()
        await runner.cleanup()

    ready = threading.Event()
    thread = threading.Thread(target=lambda: asyncio.run(serve(ready, asyncio.Event())))
    thread.start()
    try:
        assert ready.wait(30)
        url = box["url"]
        worker, out = in_background(lambda: post_batch(url, "noop", key=""))
        wait_decoding(url)
        assert healthy(url)
        worker.join(30)
        assert out["outs"][0]["meta_info"]["completion_tokens"] == 16 and out["seconds"] >= 0.025 * 16
    finally:
        if "loop" in box:
            box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(30)


def test_server_ports_lie_below_the_ephemeral_range_and_are_free():
    """A real SGLang server binds its port a minute after launch; the kernel never hands out a
    port below its ephemeral range to an outgoing connection meanwhile."""
    import socket

    from megatron_s2lpo.utils.ports import server_ports

    start = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = server_ports(8)
    assert len(set(ports)) == 8 and all(20000 <= p < start for p in ports)
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
