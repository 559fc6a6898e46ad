"""Rollout section: the learner's engine (updated after every step), the frozen explorer's
(S2L-PO) and the frozen teacher's (forward_kl / opd distillation)."""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field
from typing import Literal

from .base import check
from .model import ModelArch

ENGINE_BACKENDS = ("local", "sglang")


@dataclass(kw_only=True, slots=True)
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 disables top-k (SGLang's convention)
    max_new_tokens: int = 1024
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)  # in addition to the tokenizer's eos

    def __post_init__(self) -> None:
        check(self.temperature > 0 and math.isfinite(self.temperature),
              f"sampling.temperature must be > 0 and finite (greedy is not supported for RL rollouts), "
              f"got {self.temperature}")
        check(0 < self.top_p <= 1, f"sampling.top_p must be in (0, 1], got {self.top_p}")
        check(self.top_k == -1 or self.top_k >= 1, f"sampling.top_k must be -1 or >= 1, got {self.top_k}")
        check(self.max_new_tokens >= 1, f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        check(all(t >= 0 for t in self.stop_token_ids),
              f"sampling.stop_token_ids must be token ids >= 0, got {self.stop_token_ids}")


@dataclass(kw_only=True, slots=True)
class EngineConfig:
    """One rollout engine: an in-process `local` engine or an SGLang server (launched or attached)."""

    backend: Literal["local", "sglang"] = "local"
    model_path: str = ""  # HF checkpoint dir (explorer weights; the learner's initial weights)
    url: str = ""  # attach to a running SGLang server instead of launching one
    host: str = "127.0.0.1"
    port: int = 30000
    tp_size: int = 1
    dp_size: int = 1
    mem_fraction: float = 0.8
    api_key: str = ""
    # Name of an environment variable holding the key (the cluster launcher sets S2LPO_API_KEY),
    # so the key itself is in no config file, command line or log; used when api_key is empty.
    api_key_env: str = ""
    enable_memory_saver: bool = False  # colocated with the learner: release memory between phases
    extra_args: list[str] = field(default_factory=list)  # passed through to sglang.launch_server
    # Program that takes sglang.launch_server's flags; empty: `<python> -m sglang.launch_server`.
    # CPU demos and tests point it at `python tests/protocol_server.py`.
    launch_command: list[str] = field(default_factory=list)
    startup_timeout_s: float = 900.0  # launch -> healthy deadline
    max_restarts: int = 3  # relaunches of a launched server that died, per engine lifetime
    max_concurrency: int = 256
    request_timeout_s: float = 600.0
    max_retries: int = 3
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # A model built from code instead of loaded: with model_path empty, the trainer writes a HF
    # directory of this architecture (seeded by init_seed, optionally warm-started by
    # init_sft_steps supervised steps on the synthetic task) to <run.output_dir>/models/<name>.
    init_arch: ModelArch | None = None
    init_seed: int = 0
    init_sft_steps: int = 0

    def __post_init__(self) -> None:
        check(self.init_sft_steps >= 0, f"engine init_sft_steps must be >= 0, got {self.init_sft_steps}")
        check(1 <= self.port <= 65535, f"engine port must be in 1..65535, got {self.port}")
        check(self.tp_size >= 1 and self.dp_size >= 1,
              f"engine tp_size/dp_size must be >= 1, got {self.tp_size}/{self.dp_size}")
        check(0 < self.mem_fraction <= 1, f"engine mem_fraction must be in (0, 1], got {self.mem_fraction}")
        check(self.max_concurrency >= 1, f"engine max_concurrency must be >= 1, got {self.max_concurrency}")
        check(self.request_timeout_s > 0, f"engine request_timeout_s must be > 0, got {self.request_timeout_s}")
        check(self.max_retries >= 0, f"engine max_retries must be >= 0, got {self.max_retries}")
        check(self.startup_timeout_s > 0,
              f"engine startup_timeout_s must be > 0, got {self.startup_timeout_s}")
        check(self.max_restarts >= 0, f"engine max_restarts must be >= 0, got {self.max_restarts}")
        check(bool(self.url) or is_loopback(self.host) or bool(self.api_key or self.api_key_env),
              f"engine host {self.host!r} makes a launched SGLang server reachable from other machines; "
              "set api_key (or api_key_env) so it refuses unauthenticated calls, or keep host 127.0.0.1")

    def resolved_api_key(self) -> str:
        """api_key, or the value of the environment variable api_key_env ("" when neither is set)."""
        if self.api_key or not self.api_key_env:
            return self.api_key
        import os

        value = os.environ.get(self.api_key_env, "")
        if not value:
            raise ValueError(f"engine api_key_env={self.api_key_env!r}: that environment variable is unset or "
                             "empty; export the servers' key under that name (the cluster launcher does)")
        return value


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) only listens on / reaches this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name or a shell expression: another machine


@dataclass(kw_only=True, slots=True)
class RolloutConfig:
    learner: EngineConfig = field(default_factory=EngineConfig)
    explorer: EngineConfig = field(default_factory=EngineConfig)
    teacher: EngineConfig = field(default_factory=EngineConfig)  # algo.method forward_kl / opd
    explorer_store: str = ""  # directory of pre-generated explorer rollouts (`s2lpo explore`)
    prefetch_steps: int = 2  # explorer samples requested this many steps ahead
    reuse_explorer_samples: bool = False

    def has_model(self, name: str) -> bool:
        """Whether engine `name` (explorer / teacher) has a model source or a server to attach to."""
        engine = getattr(self, name)
        return bool(engine.model_path or engine.url or engine.init_arch)

    def __post_init__(self) -> None:
        check(self.prefetch_steps >= 0, f"rollout.prefetch_steps must be >= 0, got {self.prefetch_steps}")
