"""Protocol-server replicas for the benchmarks (imported with `benchmarks/` on sys.path)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER = [sys.executable, os.path.join(ROOT, "tests", "protocol_server.py")]


@contextlib.contextmanager
def noop_replicas(n: int, *extra: str, max_concurrency: int = 256) -> Iterator:
    """An SGLangEngine over `n` launched `--noop` protocol servers (no model, fixed answers)."""
    from megatron_s2lpo.config.rollout import EngineConfig
    from megatron_s2lpo.rollout.sglang_engine import SGLangEngine
    from megatron_s2lpo.utils.ports import free_ports

    cfg = EngineConfig(backend="sglang", model_path="noop", replicas=n, ports=free_ports(n), launch_command=SERVER,
                       extra_args=["--noop", *extra], startup_timeout_s=120, max_concurrency=max_concurrency)
    engine = SGLangEngine(cfg, name="bench")
    try:
        yield engine
    finally:
        engine.close()
