"""Launch an SGLang server process (or any program taking its flags) and wait until healthy.

`build_launch_command` turns an `EngineConfig` into `python -m sglang.launch_server ...` for
one replica (or the configured `launch_command` prefix, e.g. the SGLang-protocol test server
used on CPU). `ServerProcess` owns the process: start in its own session (SGLang forks
scheduler and detokenizer children, which are stopped with it), log to a file, report exit,
restart, stop. A log file it created itself (no `log_path`) is temporary and removed by
`stop(remove_log=True)`; runs pass a path under their output directory instead. The API key
never reaches the log or an error message: the logged command is redacted, and a server given a
key runs under `utils.redact`, which filters SGLang's own output (it logs its arguments).

Flags (SGLang 0.5.23 `server_args.py` / `arg_groups/fields/*.py`): `--port` of the replica,
`--base-gpu-id` (its first GPU: replica i starts at base_gpu_id + i * tp_size, so replicas on
one node never share a GPU), `--random-seed` (run seed + replica index: replicas do not draw
the same random stream for requests without a sampling_seed), `--enable-deterministic-inference`
(`EngineConfig.deterministic`; SGLang honours a request's `sampling_seed` only with it).

The CPU profile (`EngineConfig.profile: cpu`) is the ONE place that says how SGLang 0.5.23 runs on
a machine without a GPU (measured December 2026; the environment is `make install`'s
.venv-sglang, tools/sglang_env.py): CPU_PROFILE_ARGS, and per replica the environment variable
SGLANG_CPU_OMP_THREADS_BIND (`launch_env`), one '|' entry per device index, which SGLang reads at
the replica's --base-gpu-id (without it a second server on one machine asserts "NUMA index 1 out
of range"). Tests, benchmarks and the README use the profile; none copies its flags.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable

from ..config.rollout import EngineConfig
from ..utils.process_group import log_tail, stop_group
from ..utils.redact import filtered_launch, redact_command
from .sglang_python import sglang_python

# --device cpu: SGLang's generic device path (its own CPU engine needs a CPU build of sgl_kernel that
# is not on PyPI); torch_native attention and the pytorch sampler are its kernels without CUDA;
# no CUDA graphs; fp32 (log-probs then equal a Hugging Face recomputation to about 5e-7);
# --sleep-on-idle, else an idle scheduler spins a whole core. A small KV cache: a CPU server
# serves tiny models and a few dozen requests at once (extra_args come after and override).
# --enable-deterministic-inference is refused with torch_native (config/rollout.py says so).
CPU_PROFILE_ARGS = [
    "--device", "cpu", "--attention-backend", "torch_native", "--sampling-backend", "pytorch",
    "--disable-cuda-graph", "--dtype", "float32", "--sleep-on-idle",
    "--max-total-tokens", "16384", "--max-running-requests", "64",
]
CPU_MEM_FRACTION = 0.05  # --mem-fraction-static of the CPU profile (in place of mem_fraction)
CPU_THREADS_BIND_ENV = "SGLANG_CPU_OMP_THREADS_BIND"
# SGLang 0.5.23 takes its key only as --api-key (server_args.py reads no environment variable
# for it), and a command line is readable by every user of the machine (ps, /proc/<pid>/cmdline)
# while a process's environment is only its owner's. So a launched SGLang server gets its key in
# its environment: the command runs this short program, which appends `--api-key <the
# variable's value>` to its own arguments and runs sglang.launch_server as `python -m` does.
# SGLang also logs its arguments at start (engine.py, `server_args=...`, the key among them):
# the program has every log record of the process print the key as <redacted>: each record's
# getMessage, which every formatter calls, returns the message with the key replaced (one line:
# the job's server scripts hold one command per line). `api_key` goes
# into API_KEY_ENV (launch_env), `api_key_env` names the variable the server already has. A
# configured launch_command (a program taking SGLang's flags) gets --api-key on its command line.
API_KEY_ENV = "S2LPO_SGLANG_API_KEY"
_KEY_LAUNCHER = (
    'import logging, os, runpy, sys; key = os.environ["{var}"]; make = logging.getLogRecordFactory(); '
    'fix = lambda r: (setattr(r, "getMessage", lambda m=r.getMessage: m().replace(key, "<redacted>")), r)[-1]; '
    'logging.setLogRecordFactory(lambda *a, **k: fix(make(*a, **k))); sys.argv += ["--api-key", key]; '
    'runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=True)')


def build_launch_command(cfg: EngineConfig, *, python: str | None = None, replica: int = 0,
                         seed: int | None = None, name: str = "engine") -> list[str]:
    """Replica `replica`'s command line (flags of sglang.launch_server, SGLang 0.5.23).

    python defaults to the SGLang interpreter of this process (rollout/sglang_python.py); seed:
    the run's seed; the replica gets --random-seed seed + replica (None: SGLang's own); name: the
    engine's (rollout.<name>) for errors."""
    if not cfg.model_path:
        raise ValueError(f"rollout.{name}.model_path is empty: set the HF checkpoint directory its server "
                         f"loads (or init_arch in a recipe), or rollout.{name}.url to attach to a running server")
    if not 0 <= replica < cfg.replicas:
        raise ValueError(f"replica {replica} does not exist: the engine has replicas={cfg.replicas}")
    key_var = API_KEY_ENV if cfg.api_key else cfg.api_key_env
    if cfg.launch_command:
        prefix = list(cfg.launch_command)
    elif key_var:  # the key comes from the environment (API_KEY_ENV above)
        prefix = [python or sglang_python(), "-c", _KEY_LAUNCHER.format(var=key_var)]
    else:
        prefix = [python or sglang_python(), "-m", "sglang.launch_server"]
    args = [
        "--model-path", cfg.model_path,
        "--host", cfg.host,
        "--port", str(cfg.replica_ports()[replica]),
        "--tp-size", str(cfg.tp_size),
        "--dp-size", str(cfg.dp_size),
        "--base-gpu-id", str(cfg.base_gpu_id + replica * cfg.tp_size * cfg.dp_size),
        "--mem-fraction-static", str(CPU_MEM_FRACTION if cfg.profile == "cpu" else cfg.mem_fraction),
    ]
    if cfg.profile == "cpu":
        args += CPU_PROFILE_ARGS
    if seed is not None:
        args += ["--random-seed", str(seed + replica)]
    if cfg.deterministic:
        args.append("--enable-deterministic-inference")
    if cfg.api_key and cfg.launch_command:
        args += ["--api-key", cfg.api_key]
    if cfg.enable_memory_saver:
        args.append("--enable-memory-saver")
    if cfg.return_routed_experts:
        args.append("--enable-return-routed-experts")
    return prefix + args + list(cfg.extra_args)


def launch_env(cfg: EngineConfig, *, cores: list[int] | None = None) -> dict[str, str] | None:
    """The environment of a launched replica: None (inherit this process's) except for
    - the CPU profile, which binds device index d (a replica's --base-gpu-id) to core d mod the
      number of cores this process may use (`cores`), e.g. `0|1|0|1`: two servers on two cores
      get one each; a binding already in the environment wins;
    - a configured `api_key`, which a real server reads from API_KEY_ENV (build_launch_command)."""
    env = None
    if cfg.profile == "cpu":
        env = dict(os.environ)
        if not env.get(CPU_THREADS_BIND_ENV):
            cores = cores or sorted(os.sched_getaffinity(0))
            num_devices = cfg.base_gpu_id + cfg.replicas * cfg.tp_size * cfg.dp_size
            env[CPU_THREADS_BIND_ENV] = "|".join(str(cores[d % len(cores)]) for d in range(num_devices))
    if cfg.api_key and not cfg.launch_command:
        env = {**(os.environ if env is None else env), API_KEY_ENV: cfg.api_key}
    return env


class ServerProcess:
    """One server process: start, poll, tail its log, restart, stop."""

    def __init__(self, command: list[str], *, log_path: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.command = list(command)
        self.temporary_log = log_path is None
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="sglang-server-", suffix=".log")
            os.close(fd)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
        self.log_path = log_path
        self.env = env
        self._proc: subprocess.Popen | None = None
        self.num_starts = 0

    def start(self) -> None:
        assert not self.alive(), "start() on a running server"
        log = open(self.log_path, "ab")
        log.write(f"\n==== start {self.num_starts + 1}: {' '.join(redact_command(self.command))}\n".encode())
        log.flush()
        argv, env = filtered_launch(self.command, self.env)  # the key: in the environment, out of the log
        try:
            self._proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=env,
                                          start_new_session=True)
        finally:
            log.close()  # the child holds its own descriptor
        self.num_starts += 1

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def exit_code(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def log_tail(self, num_lines: int = 30) -> str:
        return log_tail(self.log_path, num_lines)

    def stop(self, timeout_s: float = 15.0, *, remove_log: bool = False) -> None:
        """SIGTERM the whole process group, SIGKILL it after `timeout_s`. remove_log: also delete
        a temporary log file (one this object created)."""
        try:
            if self._proc is not None:
                stop_group(self._proc, timeout_s)
        finally:
            if remove_log and self.temporary_log:
                try:
                    os.remove(self.log_path)
                except OSError:
                    pass

    def describe(self) -> str:
        return f"`{' '.join(redact_command(self.command))}` (log {self.log_path})"


async def wait_healthy(
    probe: Callable[[], Awaitable[bool]],
    *,
    url: str,
    timeout_s: float,
    process: ServerProcess | None = None,
    poll_s: float = 0.25,
) -> None:
    """Poll `probe` (GET /health) until it answers 200, the process exits, or the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process is not None and not process.alive():
            raise RuntimeError(
                f"server for {url} exited with code {process.exit_code()} before becoming healthy: "
                f"{process.describe()}\n--- last log lines ---\n{process.log_tail()}")
        if await probe():
            return
        if time.monotonic() > deadline:
            tail = f"\n--- last log lines ---\n{process.log_tail()}" if process is not None else ""
            raise TimeoutError(f"server at {url} was not healthy within {timeout_s:.0f} s (GET /health)"
                               f"{tail}")
        await asyncio.sleep(poll_s)
