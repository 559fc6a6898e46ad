"""The one-machine supervisor (launch/supervisor.py) with SGLang-protocol servers over real HTTP.

The servers are tests/protocol_server.py in --noop mode (SGLang's routes, no model: they start in
a fraction of a second); the trainer is a stand-in bash script that goes through the real health
gate (`python -m megatron_s2lpo.launch.wait_healthy`). The full recipe through NeMo-Run's
LocalExecutor is tests/integration/test_launch_local_run.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_s2lpo.launch.supervisor import ServerDiedError, SupervisedServer, Supervisor, SupervisorSpec
from megatron_s2lpo.utils.ports import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROTOCOL_SERVER = os.path.join(REPO, "tests", "protocol_server.py")


def _server(name: str, port: int, prefix: str = "") -> SupervisedServer:
    script = f"{prefix}exec {sys.executable} {PROTOCOL_SERVER} --noop --host 127.0.0.1 --port {port}\n"
    return SupervisedServer(name=name, script=script, url=f"http://127.0.0.1:{port}")


def _gate(servers: list[SupervisedServer]) -> str:
    urls = " ".join(s.url for s in servers)
    return f"{sys.executable} -m megatron_s2lpo.launch.wait_healthy --timeout-s 20 --poll-s 0.1 {urls}\n"


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.timeout(60)
def test_the_run_ends_when_the_trainer_ends_and_the_servers_are_stopped(tmp_path):
    servers = [_server("learner_server", free_port()), _server("explorer_server", free_port())]
    spec = SupervisorSpec(servers=servers, trainer_script=_gate(servers) + "exit 7\n", log_dir=str(tmp_path),
                          poll_s=0.05)
    supervisor = Supervisor(spec, log=lambda _: None)
    assert supervisor.run() == 7  # the trainer's status is the run's
    for name, server in supervisor.servers.items():
        assert _gone(server.pid), f"{name} still runs"
        assert "ready in" in (tmp_path / f"{name}.log").read_text()  # each server logs to its own file


@pytest.mark.timeout(60)
def test_a_server_that_dies_stops_the_trainer_with_an_error_naming_it(tmp_path):
    pid_file = tmp_path / "explorer.pid"
    healthy = _server("learner_server", free_port())
    dying = _server("explorer_server", free_port(), prefix=f"echo $$ > {pid_file}\n")
    marker = tmp_path / "trainer-still-ran"
    trainer = _gate([healthy, dying]) + f"kill -9 $(cat {pid_file})\nsleep 30\ntouch {marker}\n"
    spec = SupervisorSpec(servers=[healthy, dying], trainer_script=trainer, log_dir=str(tmp_path), poll_s=0.05,
                          stop_timeout_s=5)
    supervisor = Supervisor(spec, log=lambda _: None)
    start = time.monotonic()
    with pytest.raises(ServerDiedError, match=r"server explorer_server \(http://127.0.0.1:\d+\) was killed by "
                                              r"SIGKILL while the trainer was running"):
        supervisor.run()
    assert time.monotonic() - start < 20  # not the trainer's 30 s sleep
    assert not marker.exists()
    assert supervisor.trainer.proc.poll() is not None
    assert all(_gone(s.pid) for s in supervisor.servers.values())


@pytest.mark.timeout(60)
def test_sigusr1_to_the_supervisor_reaches_the_trainer(tmp_path):
    """`docker kill --signal USR1` / `kill -USR1` on a local run: the trainer is asked to stop."""
    ready, got = tmp_path / "ready", tmp_path / "got"
    trainer = (f"trap 'echo usr1 > {got}; exit 75' USR1\ntouch {ready}\n"
               "while true; do sleep 0.05; done\n")
    spec = SupervisorSpec(servers=[], trainer_script=trainer, log_dir=str(tmp_path), poll_s=0.05)
    proc = subprocess.Popen([sys.executable, "-m", "megatron_s2lpo.launch.supervisor", "--spec-json", spec.to_json()],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(30) == 75
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert got.read_text() == "usr1\n"


def test_spec_round_trips_and_refuses_duplicate_names():
    servers = [_server("a", 1), _server("b", 2)]
    spec = SupervisorSpec(servers=servers, trainer_script="true\n", trainer_env={"X": "1"})
    assert SupervisorSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError, match="unique"):
        SupervisorSpec.from_json(SupervisorSpec(servers=[servers[0], servers[0]], trainer_script="").to_json())
