"""One machine (local or Docker): start the servers, run the trainer, stop the servers when it ends.

    python -m megatron_s2lpo.launch.supervisor --spec-json '{"servers": [...], "trainer": {...}}'

The spec (built by launch/experiment.py from a LaunchPlan):

    {"servers": [{"name": "explorer_server", "script": "<bash>", "url": "http://127.0.0.1:30001",
                  "env": {"CUDA_VISIBLE_DEVICES": "4,5"}}, ...],
     "trainer": {"script": "<bash>", "env": {...}},
     "log_dir": ""}                                  # server logs; "" = the current directory

Every server is a bash script in its own session (SGLang forks scheduler and detokenizer
processes, which are stopped with it), logging to `<log_dir>/<name>.log`; the trainer script
(health gate, then the trainer) runs in its own session too, its output on this process's. The
run ends when the trainer ends: the servers are stopped and the trainer's exit status is this
process's. A server that exits while the trainer runs stops the trainer, and the run fails with
an error naming the server and the end of its log.

Signals: SIGUSR1 is passed to the trainer's processes (checkpoint after the current step, then
stop: stop_signal.py); SIGTERM, SIGINT and SIGHUP ask the same with SIGTERM; a second SIGTERM or
SIGINT stops everything at once. Standard library only: no torch.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from ..utils.process_group import log_tail, signal_group


@dataclass(kw_only=True, slots=True)
class SupervisedServer:
    name: str
    script: str  # bash: `exec <server command>`
    url: str
    env: dict[str, str] = field(default_factory=dict)


@dataclass(kw_only=True, slots=True)
class SupervisorSpec:
    servers: list[SupervisedServer]
    trainer_script: str
    trainer_env: dict[str, str] = field(default_factory=dict)
    log_dir: str = ""
    stop_timeout_s: float = 30.0  # SIGTERM -> SIGKILL grace for the trainer and each server
    poll_s: float = 0.5

    @classmethod
    def from_json(cls, text: str) -> "SupervisorSpec":
        data = json.loads(text)
        servers = [SupervisedServer(**s) for s in data.get("servers", [])]
        names = [s.name for s in servers]
        if len(set(names)) != len(names):
            raise ValueError(f"server names must be unique, got {names}")
        trainer = data["trainer"]
        return cls(servers=servers, trainer_script=trainer["script"], trainer_env=dict(trainer.get("env", {})),
                   log_dir=data.get("log_dir", ""), **{k: data[k] for k in ("stop_timeout_s", "poll_s") if k in data})

    def to_json(self) -> str:
        return json.dumps({
            "servers": [{"name": s.name, "script": s.script, "url": s.url, "env": s.env} for s in self.servers],
            "trainer": {"script": self.trainer_script, "env": self.trainer_env},
            "log_dir": self.log_dir, "stop_timeout_s": self.stop_timeout_s, "poll_s": self.poll_s,
        })


class ServerDiedError(RuntimeError):
    """A server exited while the trainer was running."""


class _ProcessGroup:
    """A bash script in its own session; signals and the stop go to its whole process group.

    Signals and log tails are utils/process_group.py's, as for rollout.sglang_server.ServerProcess
    (whose package imports torch, which this process does not need: it starts first, and fast).
    Unlike ServerProcess's stop, this one always SIGKILLs what the leader left behind.
    """

    def __init__(self, script: str, env: dict[str, str], log_path: str | None = None) -> None:
        self.log_path = log_path
        log = open(log_path, "ab") if log_path else None
        try:
            self.proc = subprocess.Popen(["bash", "-c", script], env={**os.environ, **env}, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT if log else None,
                                         start_new_session=True)
        finally:
            if log is not None:
                log.close()  # the child holds its own descriptor

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        signal_group(self.proc, sig)

    def stop(self, timeout_s: float) -> None:
        """SIGTERM the group, SIGKILL what is left of it after `timeout_s` (or at once if the leader is gone)."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        self.signal(signal.SIGKILL)  # children the leader left behind (reward workers, SGLang schedulers)
        self.proc.wait()

    def log_tail(self, num_lines: int = 30) -> str:
        return log_tail(self.log_path, num_lines)


class Supervisor:
    def __init__(self, spec: SupervisorSpec, *, log=print) -> None:
        self.spec = spec
        self.log = log
        log_dir = spec.log_dir or os.getcwd()
        os.makedirs(log_dir, exist_ok=True)
        self.log_dir = log_dir
        self.servers: dict[str, _ProcessGroup] = {}
        self.trainer: _ProcessGroup | None = None
        self._stops = 0

    def run(self) -> int:
        """Start everything, wait for the trainer, stop everything; the trainer's exit status."""
        restore = self._install_signal_handlers()
        try:
            for s in self.spec.servers:
                server = _ProcessGroup(s.script, s.env, os.path.join(self.log_dir, f"{s.name}.log"))
                self.servers[s.name] = server
                self.log(f"supervisor: started {s.name} (pid {server.pid}), log {server.log_path}")
            self.trainer = _ProcessGroup(self.spec.trainer_script, self.spec.trainer_env)
            while self.trainer.alive():
                self._check_servers()
                time.sleep(self.spec.poll_s)
            code = self.trainer.proc.returncode
            self.log(f"supervisor: the trainer exited with status {code}; stopping the servers")
            return code if code >= 0 else 128 - code
        finally:
            if self.trainer is not None:
                self.trainer.stop(self.spec.stop_timeout_s)
            for server in self.servers.values():
                server.stop(self.spec.stop_timeout_s)
            restore()

    def _check_servers(self) -> None:
        for name, server in self.servers.items():
            if server.alive():
                continue
            url = next(s.url for s in self.spec.servers if s.name == name)
            code = server.proc.returncode
            how = f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0 else \
                f"exited with status {code}"
            raise ServerDiedError(f"server {name} ({url}) {how} while the trainer was running; the trainer was "
                                  f"stopped.\n--- last lines of {server.log_path} ---\n{server.log_tail()}")

    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        handled = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        previous = {sig: signal.getsignal(sig) for sig in handled}
        for sig in handled:
            signal.signal(sig, self._on_signal)

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)

        return restore

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.trainer is None:  # nothing to checkpoint yet: stop now
            raise KeyboardInterrupt(signal.Signals(signum).name)
        if signum == signal.SIGUSR1:
            self.trainer.signal(signal.SIGUSR1)
            return
        self._stops += 1
        if self._stops > 1:  # asked twice: do not wait for the checkpoint
            self.trainer.signal(signal.SIGKILL)
            return
        os.write(2, f"supervisor: {signal.Signals(signum).name}: asking the trainer to checkpoint and stop "
                    "(again to stop at once)\n".encode())
        self.trainer.signal(signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec-json", required=True, help="the run's servers and trainer (see the module doc)")
    args = parser.parse_args(argv)
    try:
        spec = SupervisorSpec.from_json(args.spec_json)
    except (ValueError, KeyError, TypeError) as err:
        parser.error(f"--spec-json: {err}")
    try:
        return Supervisor(spec).run()
    except ServerDiedError as err:
        print(f"supervisor: error: {err}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
