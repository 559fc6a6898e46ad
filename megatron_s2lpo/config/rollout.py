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
# How launched SGLang servers run: "" (GPUs, SGLang's defaults) or "cpu" (SGLang 0.5.23 on a machine
# without a GPU; the flags are in rollout/sglang_server.py, CPU_PROFILE_ARGS).
ENGINE_PROFILES = ("", "cpu")


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
    """One rollout engine: an in-process `local` engine or a pool of SGLang servers.

    SGLang servers are launched (`replicas` processes, one server each) or attached (`url`, or
    `urls` for several). Every replica is a whole server: its own TP size, `dp_size=1`, port and
    GPUs; the engine spreads requests over the healthy replicas and weight sync reaches all.
    """

    backend: Literal["local", "sglang"] = "local"
    model_path: str = ""  # HF checkpoint dir (explorer weights; the learner's initial weights)
    url: str = ""  # attach to one running SGLang server instead of launching one
    urls: list[str] = field(default_factory=list)  # attach to several (one replica each)
    replicas: int = 1  # launched servers of this engine (one process each); with urls: their count
    host: str = "127.0.0.1"
    port: int = 30000  # replica i listens on port + i (or ports[i])
    ports: list[int] = field(default_factory=list)  # explicit per-replica ports of launched servers
    base_gpu_id: int = 0  # replica i runs on GPUs base_gpu_id + i * tp_size ... (SGLang --base-gpu-id)
    tp_size: int = 1
    dp_size: int = 1
    mem_fraction: float = 0.8
    api_key: str = ""
    # Name of an environment variable holding the key (the cluster launcher sets S2LPO_API_KEY),
    # so the key itself is in no config file, command line or log; used when api_key is empty.
    api_key_env: str = ""
    enable_memory_saver: bool = False  # colocated with the learner: release memory between phases
    # Mixture-of-experts models: launch with --enable-return-routed-experts so requests can ask for
    # the experts every token was routed to (the trainer sets it for a learner that replays them)
    return_routed_experts: bool = False
    # backend local: the in-process engine's weights and arithmetic. bfloat16 samples with a bf16
    # inference server's numerics on a CPU (the learner trains in fp32): log-probs, and for a
    # mixture of experts the routing, then differ from the learner's as on a GPU cluster.
    local_dtype: Literal["float32", "bfloat16"] = "float32"
    # --enable-deterministic-inference: the same request (prompt, sampling params, sampling_seed)
    # gives the same tokens whatever else the server batches with it (docs/rollout.md).
    deterministic: bool = False
    extra_args: list[str] = field(default_factory=list)  # passed through to sglang.launch_server (last: they win)
    # "cpu": launched servers run on the CPU (rollout/sglang_server.py CPU_PROFILE_ARGS: --device cpu,
    # torch-native attention and sampling, fp32, small KV cache, --sleep-on-idle; each replica's threads
    # bound to core (base_gpu_id + i) mod cores). "": GPUs. Only launched servers use it.
    profile: Literal["", "cpu"] = ""
    # Program that takes sglang.launch_server's flags; empty: `<python> -m sglang.launch_server`.
    # CPU demos and tests point it at `python tests/protocol_server.py`.
    launch_command: list[str] = field(default_factory=list)
    startup_timeout_s: float = 900.0  # launch -> healthy deadline
    max_restarts: int = 3  # relaunches of each launched replica (died or hung), per engine lifetime
    max_concurrency: int = 256  # requests in flight per replica
    # A /generate attempt without an answer after this long, while the server still answers
    # /health, is a hang: the request is aborted (/abort_request), a launched server is restarted,
    # and the request is resubmitted with a fresh rid. Set it above the longest generation.
    hang_timeout_s: float = 600.0
    request_timeout_s: float = 600.0  # HTTP timeout of every other call (weight updates, memory, info)
    # Attached servers only (launched ones are restarted): how long a request waits while every
    # replica is down (no answer to /health) before generation fails, instead of waiting forever.
    unavailable_timeout_s: float = 300.0
    max_retries: int = 3  # per request: 5xx / broken answers, and hangs or replica losses
    log_dir: str = ""  # launched servers' logs; empty: <run.output_dir>/logs (temporary files outside a run)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # A model built from code instead of loaded: with model_path empty, the trainer writes a HF
    # directory of this architecture (seeded by init_seed, optionally warm-started by
    # init_sft_steps supervised steps on the synthetic task) to <run.output_dir>/models/<name>.
    init_arch: ModelArch | None = None
    init_seed: int = 0
    init_sft_steps: int = 0
    # The warm start's problems: the first N of the synthetic train split (0: all of them), so
    # that RL can train on problems the warm start never saw.
    init_sft_problems: int = 0

    def __post_init__(self) -> None:
        check(self.init_sft_steps >= 0, f"engine init_sft_steps must be >= 0, got {self.init_sft_steps}")
        check(self.init_sft_problems >= 0,
              f"engine init_sft_problems must be >= 0 (0: every train problem), got {self.init_sft_problems}")
        check(1 <= self.port <= 65535, f"engine port must be in 1..65535, got {self.port}")
        check(self.tp_size >= 1 and self.dp_size >= 1,
              f"engine tp_size/dp_size must be >= 1, got {self.tp_size}/{self.dp_size}")
        check(0 < self.mem_fraction <= 1, f"engine mem_fraction must be in (0, 1], got {self.mem_fraction}")
        check(self.max_concurrency >= 1, f"engine max_concurrency must be >= 1, got {self.max_concurrency}")
        check(self.request_timeout_s > 0, f"engine request_timeout_s must be > 0, got {self.request_timeout_s}")
        check(self.hang_timeout_s > 0, f"engine hang_timeout_s must be > 0, got {self.hang_timeout_s}")
        check(self.unavailable_timeout_s > 0,
              f"engine unavailable_timeout_s must be > 0, got {self.unavailable_timeout_s}")
        check(self.max_retries >= 0, f"engine max_retries must be >= 0, got {self.max_retries}")
        check(self.startup_timeout_s > 0,
              f"engine startup_timeout_s must be > 0, got {self.startup_timeout_s}")
        check(self.max_restarts >= 0, f"engine max_restarts must be >= 0, got {self.max_restarts}")
        check(self.profile in ENGINE_PROFILES, f"engine profile must be one of {ENGINE_PROFILES}, got {self.profile!r}")
        check(not (self.profile == "cpu" and self.deterministic),
              "engine profile cpu with deterministic: true: SGLang 0.5.23 refuses --enable-deterministic-inference "
              "with the torch_native attention backend the CPU profile uses; set deterministic: false")
        check(self.attached or is_loopback(self.host) or bool(self.api_key or self.api_key_env),
              f"engine host {self.host!r} makes a launched SGLang server reachable from other machines; "
              "set api_key (or api_key_env) so it refuses unauthenticated calls, or keep host 127.0.0.1")
        check(self.base_gpu_id >= 0, f"engine base_gpu_id must be >= 0, got {self.base_gpu_id}")
        self._check_replicas()

    def _check_replicas(self) -> None:
        check(self.replicas >= 1, f"engine replicas must be >= 1, got {self.replicas}")
        check(not (self.url and self.urls), "engine url and urls are both set: give one server in url or "
              "every replica in urls")
        check(not self.attached or self.replicas in (1, len(self.urls)),
              f"engine replicas={self.replicas} launches servers, but url/urls attach to {len(self.urls) or 1} "
              "running one(s): list every attached replica in urls (replicas may then be left at 1)")
        check(not self.ports or len(self.ports) == self.replicas,
              f"engine ports has {len(self.ports)} entries for replicas={self.replicas}: give one port per replica")
        for i, port in enumerate(self.ports):
            check(1 <= port <= 65535, f"engine ports[{i}] must be in 1..65535, got {port}")
        for i, url in enumerate(self.urls):
            check(url.startswith(("http://", "https://")),
                  f"engine urls[{i}] must be an http(s) URL, got {url!r}")
        for what, items in (("urls", [u.rstrip("/") for u in self.urls]), ("ports", self.replica_ports())):
            seen: dict = {}
            for i, item in enumerate(items):
                check(item not in seen, f"engine replicas {seen.get(item)} and {i} share {what[:-1]} {item}: "
                      f"every replica needs its own {what[:-1]}")
                seen[item] = i

    @property
    def attached(self) -> bool:
        """Whether this engine attaches to running servers instead of launching them."""
        return bool(self.url or self.urls)

    def replica_ports(self) -> list[int]:
        """The port of each launched replica (port + i unless `ports` lists them)."""
        return list(self.ports) if self.ports else [self.port + i for i in range(self.replicas)]

    def replica_urls(self) -> list[str]:
        """Every replica's URL: the attached ones, or the launched servers' host:port."""
        if self.attached:
            return [u.rstrip("/") for u in (self.urls or [self.url])]
        return [f"http://{self.host}:{port}" for port in self.replica_ports()]

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
        return bool(engine.model_path or engine.attached or engine.init_arch)

    def __post_init__(self) -> None:
        check(self.prefetch_steps >= 0, f"rollout.prefetch_steps must be >= 0, got {self.prefetch_steps}")
