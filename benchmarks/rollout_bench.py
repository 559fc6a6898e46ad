"""Rollout client overhead: requests/s through SGLangClient / SGLangEngine vs raw aiohttp posts.

Run:
    .venv/bin/python benchmarks/rollout_bench.py            # 2000 requests per cell
    .venv/bin/python benchmarks/rollout_bench.py --quick    # 200 requests per cell (seconds)

Starts the SGLang-protocol test server in `--noop` mode (fixed 16-token answers with log-probs,
no model) on a free port, then for concurrency 1, 8 and 64 sends the same /generate payloads
  raw     plain aiohttp posts under a semaphore, answer decoded as JSON;
  client  SGLangClient.generate (payload building, retries wrapper, answer checks, Completion);
  engine  SGLangEngine.generate attached to the server (the synchronous facade over its loop
          thread, what the trainer calls).
For each it prints requests/s (best of `--repeats`) and the benchmark process's own CPU time
per request (the server runs in another process), so the client's cost is visible even when
the single-process test server is the throughput limit.

`--real`: the same three cells against a real SGLang 0.5.23 server on this CPU (a tiny Qwen3
built from code, launched by SGLangEngine with `profile: cpu` from the .venv-sglang environment
that `make install` builds; 64 requests per cell, concurrency 1 and 16, no replica table):
    flock /tmp/s2lpo-heavy.lock .venv/bin/python benchmarks/rollout_bench.py --real

Then the replica pool: SGLangEngine over 1, 2 and 4 launched noop replicas (64 requests in flight
per replica), requests/s of the same requests, without and with a simulated 50 ms generation
time per request (`--delay-s 0.05`: a replica's throughput is then bounded by its own latency, as
a GPU server's is, and the pool's should grow with the replicas; without it, every replica
competes for this machine's CPU cores).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time

import aiohttp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_s2lpo.config.rollout import EngineConfig  # noqa: E402
from megatron_s2lpo.rollout.engine import GenerateRequest  # noqa: E402
from megatron_s2lpo.rollout.sglang_client import SGLangClient, generate_payload  # noqa: E402
from megatron_s2lpo.rollout.sglang_engine import SGLangEngine  # noqa: E402
from megatron_s2lpo.rollout.sglang_server import ServerProcess, wait_healthy  # noqa: E402
from megatron_s2lpo.utils.ports import free_port, server_ports

SERVER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests",
                      "protocol_server.py")


def make_requests(num: int) -> list[GenerateRequest]:
    return [GenerateRequest(request_id=f"b{i}", prompt_ids=list(range(4, 68)), max_new_tokens=16,
                            temperature=0.8, seed=i) for i in range(num)]


async def run_raw(url: str, reqs: list[GenerateRequest], concurrency: int) -> None:
    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def one(req: GenerateRequest) -> dict:
            async with sem:
                async with session.post(url + "/generate", json=generate_payload(req)) as resp:
                    return await resp.json()
        await asyncio.gather(*(one(r) for r in reqs))


async def run_client(url: str, reqs: list[GenerateRequest], concurrency: int) -> None:
    client = SGLangClient(url, max_concurrency=concurrency)
    try:
        await client.generate(reqs)
    finally:
        await client.close()


def timed(fn) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--real", action="store_true", help="a real SGLang server on this CPU instead of the noop one")
    args = parser.parse_args()
    if args.real:
        return real_server_table(args.repeats)
    num = 200 if args.quick else 2000
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = os.path.join(tempfile.gettempdir(), f"rollout-bench-server-{port}.log")
    server = ServerProcess([sys.executable, SERVER, "--noop", "--port", str(port)], log_path=log)
    server.start()
    try:
        probe = SGLangClient(url)

        async def healthy() -> None:
            await wait_healthy(probe.health, url=url, timeout_s=60, process=server)
            await probe.close()

        asyncio.run(healthy())
        reqs = make_requests(num)
        print(f"{num} requests per cell, 16 output tokens each, noop server on {url}")
        client_table(url, reqs, args.repeats)
    finally:
        server.stop()
        os.remove(log)
    replica_table(reqs, args.repeats)


def real_server_table(repeats: int) -> None:
    """raw / client / engine against one real SGLang server (CPU profile) serving a tiny model."""
    from megatron_s2lpo.config.model import ModelArch
    from megatron_s2lpo.data.tokenizer import build_synthetic_tokenizer
    from megatron_s2lpo.rollout.local import LocalEngine

    tok = build_synthetic_tokenizer()
    arch = ModelArch(family="qwen3", vocab_size=len(tok), hidden_size=32, ffn_hidden_size=64, num_layers=2,
                     num_attention_heads=4, num_query_groups=2, head_dim=8, qk_layernorm=True)
    with tempfile.TemporaryDirectory(prefix="rollout-bench-model-") as model_dir:
        LocalEngine.from_arch(arch, tokenizer=tok, init_seed=0).save_pretrained(model_dir)
        # the raw cells post through their own session: the server's own engine only launches it
        server = SGLangEngine(EngineConfig(backend="sglang", model_path=model_dir, profile="cpu",
                                           port=server_ports(1)[0], startup_timeout_s=900), name="bench")
        try:
            reqs = make_requests(64)  # a CPU server answers a few requests per second at concurrency 1
            print(f"64 requests per cell, 16 output tokens each, real SGLang 0.5.23 (CPU profile) on {server.url}")
            client_table(server.url, reqs, repeats, concurrencies=(1, 16))
        finally:
            server.close()


def client_table(url: str, reqs: list[GenerateRequest], repeats: int, concurrencies=(1, 8, 64)) -> None:
    num = len(reqs)
    print(f"{'concurrency':>11} | {'raw req/s':>9} {'us cpu/req':>10} | {'client req/s':>12} "
          f"{'us cpu/req':>10} | {'engine req/s':>12} {'us cpu/req':>10} | client/raw")
    for concurrency in concurrencies:
        engine = SGLangEngine(EngineConfig(backend="sglang", url=url, max_concurrency=concurrency))
        cells = {"raw": [], "client": [], "engine": []}
        for _ in range(repeats):  # interleaved so drift hits all three alike
            cells["raw"].append(timed(lambda c=concurrency: asyncio.run(run_raw(url, reqs, c))))
            cells["client"].append(timed(lambda c=concurrency: asyncio.run(run_client(url, reqs, c))))
            cells["engine"].append(timed(lambda e=engine: e.generate(reqs)))
        engine.close()
        best = {k: min(v) for k, v in cells.items()}
        row = [f"{concurrency:>11}"]
        for key, width in (("raw", 9), ("client", 12), ("engine", 12)):
            wall, cpu = best[key]
            row.append(f"{num / wall:>{width}.0f} {1e6 * cpu / num:>10.0f}")
        ratio = best["raw"][0] / best["client"][0]
        print(" | ".join(row) + f" | {ratio:>9.2f}")


def replica_table(reqs: list[GenerateRequest], repeats: int) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from benchmarks_servers import noop_replicas

    print(f"\nreplica pool: {len(reqs)} requests, 64 in flight per replica, best of {repeats}")
    print(f"{'replicas':>8} | {'noop req/s':>10} | {'50 ms/request req/s':>19}")
    for n in (1, 2, 4):
        cells = []
        for extra in ((), ("--delay-s", "0.05")):
            with noop_replicas(n, *extra, max_concurrency=64) as engine:
                engine.generate(reqs[:64])  # warm up the connections
                cells.append(len(reqs) / min(timed(lambda: engine.generate(reqs))[0] for _ in range(repeats)))
        print(f"{n:>8} | {cells[0]:>10.0f} | {cells[1]:>19.0f}")


if __name__ == "__main__":
    main()
