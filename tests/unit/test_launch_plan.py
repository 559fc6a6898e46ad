"""Launch planning (no nemo_run): node split, server commands, trainer overrides, health gate."""

from __future__ import annotations

import dataclasses
import http.server
import os
import re
import shlex
import subprocess
import sys
import threading

import pytest

from megatron_s2lpo.config import load_config
from megatron_s2lpo.launch.plan import (API_KEY_SETUP, EMBEDDED_CONFIG_PATH, ClusterLayout, local_host,
                                        num_gpus_summary, plan_launch, server_script, slurm_host)
from megatron_s2lpo.launch.wait_healthy import main as wait_main
from megatron_s2lpo.launch.wait_healthy import probe_health, wait_all_healthy
from megatron_s2lpo.rollout.sglang_server import build_launch_command

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE_8B = os.path.join(REPO, "examples", "qwen3_8b_explorer_1p7b.yaml")


# The recipe serves each role with several replicas; most tests here check one server per role.
ONE_SERVER = ["rollout.learner.replicas=1", "rollout.learner.tp_size=8", "rollout.explorer.replicas=1",
              "rollout.explorer.dp_size=8"]


def _plan(overrides=(), *, replicas=False, one_machine=False, host=slurm_host, **layout):
    cfg = load_config(RECIPE_8B, ([] if replicas else ONE_SERVER) + list(overrides))
    return cfg, plan_launch(cfg, RECIPE_8B, ClusterLayout(**{"num_nodes": 4, **layout}), one_machine=one_machine,
                            host=host)


def _trainer_line(script: str) -> str:
    """The line that runs the trainer (python or torchrun), as the script has it."""
    return next(line for line in script.splitlines() if " megatron_s2lpo.cli train " in line)


def _trainer_args(script: str) -> list[str]:
    return _trainer_line(script).split()


def test_separate_servers_take_one_node_each_and_get_nccl_rendezvous():
    cfg, plan = _plan()
    assert [(g.name, g.num_nodes, g.gpus_per_node) for g in plan.groups] == [
        ("learner", 2, 8), ("learner_server", 1, 8), ("explorer", 1, 8)]
    assert num_gpus_summary(plan) == {"learner": 16, "learner_server": 8, "explorer_server": 8}
    assert not plan.colocated
    assert plan.trainer_overrides == [
        "rollout.learner.url=http://${S2LPO_LEARNER_SERVER_HOST}:30000", "rollout.learner.api_key=",
        "rollout.learner.api_key_env=S2LPO_API_KEY", "sync.transport=distributed",
        "sync.master_address=${S2LPO_LEARNER_HOST}", "sync.master_port=29600",
        "rollout.explorer.url=http://${S2LPO_EXPLORER_HOST}:30001", "rollout.explorer.api_key=",
        "rollout.explorer.api_key_env=S2LPO_API_KEY", "run.resume=true"]
    # Server commands are exactly the engine's own launch command, on all interfaces, behind the job's key.
    learner, explorer = plan.servers
    expected = build_launch_command(dataclasses.replace(cfg.rollout.learner, host="0.0.0.0",
                                                        api_key_env="S2LPO_API_KEY"),
                                    python="${S2LPO_SGLANG_PYTHON:-python}", seed=cfg.run.seed)
    assert learner.command == expected
    # the server reads the job's key from its environment (sglang_server.API_KEY_ENV), not argv
    assert explorer.command[:2] == ["${S2LPO_SGLANG_PYTHON:-python}", "-c"]
    assert 'os.environ["S2LPO_API_KEY"]' in explorer.command[2] and "sglang.launch_server" in explorer.command[2]
    flags = dict(zip(explorer.command[3::2], explorer.command[4::2]))
    assert flags == {"--model-path": "/models/Qwen3-1.7B-Base", "--host": "0.0.0.0", "--port": "30001",
                     "--tp-size": "1", "--dp-size": "8", "--base-gpu-id": "0", "--mem-fraction-static": "0.85",
                     "--random-seed": str(cfg.run.seed)}
    line = server_script(explorer).splitlines()[-1]
    assert line == ('exec "${S2LPO_SGLANG_PYTHON:-python}" ' + " ".join(shlex.quote(a) for a in explorer.command[1:]))
    # bash runs the image's SGLang interpreter when the variable is set, `python` otherwise
    for env, python in (({"S2LPO_SGLANG_PYTHON": "/opt/sglang/bin/python"}, "/opt/sglang/bin/python"), ({}, "python")):
        echo = line.replace("exec ", "printf '%s\\n' ", 1)
        out = subprocess.run(["bash", "-c", echo], env={"PATH": os.environ["PATH"], "S2LPO_API_KEY": "k1", **env},
                             capture_output=True, text=True, check=True).stdout.split("\n")
        assert out[:3] == [python, "-c", explorer.command[2]] and "k1" not in out


def test_cluster_servers_require_the_jobs_key_and_one_machine_servers_stay_on_loopback():
    cfg, plan = _plan()
    # the key is made when the job starts: random per job, 64 hex digits, written nowhere
    assert plan.setup_lines == [API_KEY_SETUP]
    keys = {subprocess.run(["bash", "-c", API_KEY_SETUP + '; printf %s "$S2LPO_API_KEY"'], capture_output=True,
                           text=True, check=True, env={"PATH": os.environ["PATH"]}).stdout for _ in range(2)}
    assert len(keys) == 2 and all(re.fullmatch(r"[0-9a-f]{64}", k) for k in keys)
    # NeMo-Run's batch script runs under `set -evx`: the trace must not print the key into the job's log
    traced = subprocess.run(["bash", "-c", "set -evx\n" + API_KEY_SETUP + '\necho "x=$-" >&2\n{ set +x; } 2>/dev/null\nprintf %s "$S2LPO_API_KEY"'],
                            capture_output=True, text=True, check=True, env={"PATH": os.environ["PATH"]})
    assert re.fullmatch(r"[0-9a-f]{64}", traced.stdout) and traced.stdout not in traced.stderr
    assert "x=" in traced.stderr and "x" in traced.stderr.split("x=")[-1]  # tracing is on again after it
    for server in plan.servers:  # every server binding all interfaces requires the key
        flags = dict(zip(server.command[3::2], server.command[4::2]))
        assert flags["--host"] == "0.0.0.0" and 'os.environ["S2LPO_API_KEY"]' in server.command[2]
    # the trainer reads the key from its environment: no key on its command line or in its config
    os.environ["S2LPO_API_KEY"] = "job-key"
    try:
        trainer_cfg = load_config(RECIPE_8B, ONE_SERVER + list(plan.trainer_overrides))
        assert trainer_cfg.rollout.learner.api_key == "" and trainer_cfg.rollout.learner.resolved_api_key() == "job-key"
        assert trainer_cfg.rollout.explorer.resolved_api_key() == "job-key"
    finally:
        del os.environ["S2LPO_API_KEY"]
    with pytest.raises(ValueError, match="S2LPO_API_KEY"):
        trainer_cfg.rollout.learner.resolved_api_key()
    # one machine (local, Docker with the host network): loopback only, no key needed
    _, local = _plan(one_machine=True, host=local_host)
    assert local.setup_lines == [] and not any("api_key" in o for o in local.trainer_overrides)
    assert all(dict(zip(s.command[3::2], s.command[4::2]))["--host"] == "127.0.0.1" for s in local.servers)
    # a server bound outside loopback without a key is refused
    with pytest.raises(ValueError, match="rollout.learner.*api_key|api_key"):
        load_config(RECIPE_8B, ["rollout.learner.host=0.0.0.0", "rollout.learner.url="])


def test_configured_launch_command_is_kept():
    _, plan = _plan(["rollout.explorer.launch_command=[python, tests/protocol_server.py]"])
    assert plan.servers[1].command[:2] == ["python", "tests/protocol_server.py"]
    assert plan.servers[1].command[2:4] == ["--model-path", "/models/Qwen3-1.7B-Base"]


def test_trainer_script_waits_for_every_server_then_torchruns():
    _, plan = _plan()
    lines = plan.trainer_script.strip().splitlines()
    gate = next(i for i, line in enumerate(lines) if "megatron_s2lpo.launch.wait_healthy" in line)
    run = lines.index(_trainer_line(plan.trainer_script))
    finished = next(i for i, line in enumerate(lines) if "megatron_s2lpo.launch.run_state" in line)
    assert lines[:3] == ["set -euo pipefail", "trap '' USR1", "trap 's2lpo_terminated=1' TERM"]
    assert finished < gate < run  # a chained job after the last step ends before waiting for servers
    assert '"http://${S2LPO_LEARNER_SERVER_HOST}:30000" "http://${S2LPO_EXPLORER_HOST}:30001"' in lines[gate]
    assert "--timeout-s 1800" in lines[gate]
    args = _trainer_args(plan.trainer_script)
    # torch's launcher through the named interpreter, never a bare `torchrun` from the node's PATH
    assert args[:12] == ["python", "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "8",
                         "--node-rank", "${SLURM_NODEID:-0}", "--master-addr", '"${S2LPO_LEARNER_HOST}"',
                         "--master-port"]
    assert args[13:17] == ["-m", "megatron_s2lpo.cli", "train", f'"{EMBEDDED_CONFIG_PATH}"']
    assert _trainer_line(plan.trainer_script).endswith('"run.resume=true" || status=$?')


def test_embedded_config_round_trips_and_bash_expands_the_overrides(tmp_path):
    cfg, plan = _plan(["algo.t_mix=77"])
    body = re.search(r"<<'S2LPO_CONFIG_EOF'\n(.*?)\nS2LPO_CONFIG_EOF\n", plan.trainer_script, re.S).group(1)
    path = tmp_path / "c.yaml"
    path.write_text(body)
    assert load_config(str(path)).to_dict() == cfg.to_dict()
    assert load_config(str(path)).algo.t_mix == 77
    # Let bash expand the generated arguments with hosts set, exactly as srun would.
    last = _trainer_line(plan.trainer_script).replace("python -m torch.distributed.run", "printf '%s\\n'", 1)
    last = last.split(" || ")[0]
    env = {**os.environ, "S2LPO_LEARNER_HOST": "n1", "S2LPO_LEARNER_SERVER_HOST": "n3",
           "S2LPO_EXPLORER_HOST": "n4", "SLURM_NODEID": "1", "S2LPO_CONFIG": "/t/s2lpo-config-77.Ab12Cd"}
    out = subprocess.run(["bash", "-c", last], env=env, capture_output=True, text=True, check=True).stdout.split("\n")
    assert "--node-rank" in out and out[out.index("--node-rank") + 1] == "1"
    assert out[out.index("--master-addr") + 1] == "n1"
    assert "/t/s2lpo-config-77.Ab12Cd" in out
    for expected in ("rollout.learner.url=http://n3:30000", "sync.master_address=n1",
                     "rollout.explorer.url=http://n4:30001"):
        assert expected in out


def test_colocated_learner_server_shares_the_learner_nodes():
    cfg, plan = _plan(["sync.transport=tensor", "rollout.learner.mem_fraction=0.3"], num_nodes=3,
                      trainer_provides=("cuda", "sglang"))
    assert [(g.name, g.num_nodes) for g in plan.groups] == [("learner", 2), ("explorer", 1)]
    assert plan.colocated
    learner = plan.servers[0]
    assert learner.group == "learner" and "--enable-memory-saver" in learner.command
    assert learner.command[learner.command.index("--mem-fraction-static") + 1] == "0.3"
    assert "rollout.learner.url=http://${S2LPO_LEARNER_HOST}:30000" in plan.trainer_overrides
    assert "sync.transport=tensor" in plan.trainer_overrides
    assert not any(o.startswith("sync.master") for o in plan.trainer_overrides)
    # explicit choice wins over the config's transport
    _, plan = _plan(["sync.transport=tensor"], colocate_learner_server=False)
    assert not plan.colocated and "sync.transport=distributed" in plan.trainer_overrides


def test_replicas_share_their_node_each_on_its_own_gpus_and_ports():
    cfg, plan = _plan(replicas=True)
    assert [(g.name, g.num_nodes, g.gpus_per_node) for g in plan.groups] == [
        ("learner", 2, 8), ("learner_server", 1, 8), ("explorer", 1, 8)]
    learner, explorer = plan.servers
    assert len(learner.commands) == len(explorer.commands) == 8 and learner.command == learner.commands[0]
    for i, command in enumerate(learner.commands):
        flags = dict(zip(command[3::2], command[4::2]))
        assert (flags["--port"], flags["--base-gpu-id"], flags["--tp-size"], flags["--dp-size"]) == (
            str(30000 + 100 * i), str(i), "1", "1")
        assert flags["--random-seed"] == str(cfg.run.seed + i)
    urls = [f"http://${{S2LPO_LEARNER_SERVER_HOST}}:{30000 + 100 * i}" for i in range(8)]
    assert learner.urls == urls
    assert f"rollout.learner.urls=[{','.join(urls)}]" in plan.trainer_overrides
    assert load_config(RECIPE_8B, [f"rollout.learner.urls=[{','.join(u.replace('${S2LPO_LEARNER_SERVER_HOST}', 'n3') for u in urls)}]"]).rollout.learner.replica_urls()[7] == "http://n3:30700"
    script = server_script(learner).splitlines()
    assert script[:2] == ["set -uo pipefail", "trap 'kill 0' TERM INT"] and script[-1] == "wait"
    assert [line.endswith(" &") for line in script[2:-1]] == [True] * 8
    subprocess.run(["bash", "-n"], input=server_script(learner), text=True, check=True)
    gate = next(line for line in plan.trainer_script.splitlines() if "wait_healthy" in line)
    assert all(f'"{url}"' in gate for url in learner.urls + explorer.urls)  # every replica is awaited
    with pytest.raises(ValueError, match="rollout.learner.dp_size=2: SGLang refuses NCCL .*rollout.learner.replicas"):
        _plan(["rollout.learner.replicas=1", "rollout.learner.dp_size=2"], replicas=True)


def test_disk_transport_stays_disk_and_no_resume_flag():
    _, plan = _plan(["sync.transport=disk"], resume=False)
    assert not any(o.startswith("sync.") for o in plan.trainer_overrides)
    assert "run.resume=true" not in plan.trainer_overrides


def test_tiny_cpu_config_needs_no_server_and_runs_one_process():
    path = os.path.join(REPO, "examples", "tiny_cpu.yaml")
    cfg = load_config(path, ["run.num_steps=2"])
    plan = plan_launch(cfg, path, ClusterLayout(num_nodes=1, gpus_per_node=0, resume=False), host=local_host,
                       user_overrides=("run.num_steps=2", "run.name=a b"), embed_config=False)
    assert plan.servers == [] and plan.trainer_overrides == []
    assert _trainer_line(plan.trainer_script) == (f"python -m megatron_s2lpo.cli train {path} "
                                                  "run.num_steps=2 'run.name=a b' || status=$?")
    assert "wait_healthy" not in plan.trainer_script and "run_state" not in plan.trainer_script  # no resume


@pytest.mark.parametrize("overrides, layout, message", [
    ([], {"num_nodes": 2}, "leaves no node for the learner"),
    (["learner.tensor_parallel_size=3"], {}, "not a multiple of"),
    (["rollout.explorer.tp_size=4", "rollout.explorer.dp_size=4"], {}, "rollout.explorer: replicas*tp_size*dp_size = 16"),
    (["rollout.explorer.replicas=3", "rollout.explorer.dp_size=3"], {}, "rollout.explorer: replicas*tp_size*dp_size = 9"),
    (["rollout.learner.tp_size=4", "rollout.learner.dp_size=2"], {}, "rollout.learner.dp_size=2"),
])
def test_layout_errors_name_the_problem(overrides, layout, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _plan(overrides, **layout)


def test_cluster_layout_validation():
    with pytest.raises(ValueError, match="must differ"):
        ClusterLayout(learner_port=29500)
    with pytest.raises(ValueError, match="num_nodes"):
        ClusterLayout(num_nodes=0)


# ----------------------------------------------------------------------------- health gate


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def health_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server
    server.shutdown()
    server.server_close()


@pytest.mark.timeout(30)
def test_wait_healthy_passes_when_all_servers_answer(health_server):
    url, _ = health_server
    assert probe_health(url) == (True, "HTTP 200")
    assert wait_main(["--timeout-s", "5", "--poll-s", "0.05", url, url + "/"]) == 0


@pytest.mark.timeout(30)
def test_wait_healthy_times_out_naming_the_laggard(health_server, capsys, monkeypatch):
    url, _ = health_server
    monkeypatch.setattr(_Health, "status", 503)  # up, but still loading
    dead = "http://127.0.0.1:1"  # nothing listens there
    with pytest.raises(TimeoutError) as err:
        wait_all_healthy([url, dead], timeout_s=0.3, poll_s=0.05, log=lambda _: None)
    assert "2 of 2 SGLang server(s)" in str(err.value)
    assert f"{url}/health: last answer: HTTP 503" in str(err.value)
    assert f"{dead}/health: last answer:" in str(err.value)
    assert wait_main(["--timeout-s", "0.2", "--poll-s", "0.05", url]) == 1
    assert "wait_healthy: error:" in capsys.readouterr().err


@pytest.mark.timeout(30)
def test_wait_healthy_waits_for_a_late_server():
    seen = []

    def probe(url):  # healthy on the third poll
        seen.append(url)
        return len(seen) >= 3, "HTTP 503"

    assert wait_all_healthy(["http://x:1"], timeout_s=10, poll_s=0.01, probe=probe, log=lambda _: None) >= 0
    assert len(seen) == 3
    with pytest.raises(ValueError, match="http://"):
        wait_all_healthy(["node1:30000"], timeout_s=1)


def test_wait_healthy_module_runs_without_heavy_imports():
    code = ("import sys, megatron_s2lpo.launch.wait_healthy; "
            "print(sorted(m for m in ('torch', 'nemo_run', 'megatron') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_distillation_gets_a_teacher_server_on_its_own_node():
    _, plan = _plan(["algo.method=opd", "algo.t_mix=0", "rollout.teacher.backend=sglang",
                     "rollout.teacher.model_path=/models/Qwen3-8B-RL", "rollout.teacher.tp_size=2",
                     "rollout.teacher.dp_size=4"])
    assert [(g.name, g.num_nodes, g.gpus_per_node) for g in plan.groups] == [
        ("learner", 2, 8), ("learner_server", 1, 8), ("teacher", 1, 8)]
    teacher = plan.servers[-1]
    assert teacher.name == "teacher_server" and teacher.url == "http://${S2LPO_TEACHER_HOST}:30002"
    flags = dict(zip(teacher.command[3::2], teacher.command[4::2]))
    assert flags["--model-path"] == "/models/Qwen3-8B-RL" and flags["--port"] == "30002"
    assert "rollout.teacher.url=http://${S2LPO_TEACHER_HOST}:30002" in plan.trainer_overrides
    assert not any(o.startswith("rollout.explorer.url") for o in plan.trainer_overrides)  # t_mix=0: no explorer


def test_staged_recipe_runs_the_trainer_alone():
    recipe = os.path.join(REPO, "examples", "tiny_bridge_cpu.yaml")
    cfg = load_config(recipe)
    plan = plan_launch(cfg, recipe, ClusterLayout(num_nodes=2, gpus_per_node=0))
    assert [g.name for g in plan.groups] == ["learner"] and not plan.servers
    assert plan.learner_nodes == 2


def test_ports_must_differ():
    with pytest.raises(ValueError, match="teacher_port"):
        ClusterLayout(teacher_port=30001)


# ----------------------------------------------------------------------------- trainer environment


def test_colocation_the_trainer_environment_cannot_run_is_refused_at_plan_time(monkeypatch):
    from megatron_s2lpo.sync import transports

    # The tensor transport serializes with the trainer's own code (rollout/sglang_tensors.py), so the
    # image's trainer (CUDA, no SGLang) can run a colocated learner server.
    assert _plan(["sync.transport=tensor", "rollout.learner.mem_fraction=0.3"], num_nodes=3)[1].colocated
    with pytest.raises(ValueError, match=r"sync.transport=tensor .* needs cuda in the trainer's own environment"
                                         r".*--no-colocate.*sync.transport=disk.*--trainer-provides cuda"):
        _plan(["sync.transport=tensor", "rollout.learner.mem_fraction=0.3"], num_nodes=3, trainer_provides=())
    with pytest.raises(ValueError, match="needs cuda"):  # the NCCL broadcast needs CUDA in the trainer
        _plan(trainer_provides=())
    _plan(["sync.transport=disk"], trainer_provides=())  # shared storage needs nothing
    # The check reads what the transport class declares: a transport that needed SGLang in the
    # trainer's process would make colocation unplannable with the image.
    monkeypatch.setattr(transports.TensorTransport, "trainer_needs", ("cuda", "sglang"))
    with pytest.raises(ValueError, match="needs sglang in the trainer's own environment"):
        _plan(["sync.transport=tensor", "rollout.learner.mem_fraction=0.3"], num_nodes=3)


def test_transports_declare_what_the_trainer_needs():
    from megatron_s2lpo.sync.transports import trainer_needs

    assert trainer_needs("tensor") == ("cuda",)
    assert trainer_needs("distributed") == ("cuda",)
    assert trainer_needs("disk") == () and trainer_needs("tensor", "in_process") == ()


# ----------------------------------------------------------------------------- SGLang interpreter


def test_one_rule_picks_the_sglang_interpreter(tmp_path, monkeypatch):
    from megatron_s2lpo.rollout.sglang_python import SGLANG_PYTHON_ENV, sglang_python, sglang_python_expr

    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert sglang_python({}, project_env=str(tmp_path / "absent")) == sys.executable
    # the project's own environment (make install builds .venv-sglang) comes before the trainer's
    assert sglang_python({}, project_env=str(fake)) == str(fake)
    assert sglang_python({SGLANG_PYTHON_ENV: str(fake)}, project_env="/nope") == str(fake)
    with pytest.raises(ValueError, match="S2LPO_SGLANG_PYTHON='/nope/python' is not an executable"):
        sglang_python({SGLANG_PYTHON_ENV: "/nope/python"})
    # servers the trainer launches itself use the same rule (rollout/sglang_engine.py)
    cfg = load_config(RECIPE_8B)
    monkeypatch.setenv(SGLANG_PYTHON_ENV, str(fake))
    assert build_launch_command(cfg.rollout.explorer)[:3] == [str(fake), "-m", "sglang.launch_server"]
    monkeypatch.delenv(SGLANG_PYTHON_ENV)
    assert build_launch_command(cfg.rollout.explorer)[0] == sglang_python({})
    # ... and the launch plan writes it for the node, falling back to the trainer's interpreter there
    _, plan = _plan(python="/opt/py/bin/python")
    assert plan.servers[0].command[0] == sglang_python_expr("/opt/py/bin/python") == \
        "${S2LPO_SGLANG_PYTHON:-/opt/py/bin/python}"


# ----------------------------------------------------------------------------- trainer script


def _stub_python(tmp_path, body: str):
    """An executable standing in for the node's python: it sees `-m <module> ...`."""
    stub = tmp_path / "python"
    stub.write_text("#!/bin/bash\n" + body)
    stub.chmod(0o755)
    return str(stub)


@pytest.mark.parametrize("trainer, finished, status", [
    ("exit 0", 1, 0),  # the run finished normally
    ("exit 75", 1, 0),  # stopped on request after a checkpoint (CONTINUE_EXIT_CODE): the job did its part
    ('echo 3 > "$S2LPO_STOP_MARKER"; exit 0', 1, 0),  # the same under torchrun, through the marker
    ("exit 3", 1, 3),  # a failure stays a failure (Slurm requeues it with --retries)
    ("exit 3", 0, 0),  # a chained job after the last checkpointed step never starts the trainer
])
def test_trainer_script_maps_the_trainers_outcome(tmp_path, trainer, finished, status):
    recipe = os.path.join(REPO, "examples", "tiny_cpu.yaml")
    stub = _stub_python(tmp_path, f'if [ "$2" = megatron_s2lpo.launch.run_state ]; then exit {finished}; fi\n'
                                  f'touch "{tmp_path}/trainer-ran"\n{trainer}\n')
    plan = plan_launch(load_config(recipe), recipe, ClusterLayout(num_nodes=1, gpus_per_node=0, python=stub),
                       host=local_host, embed_config=False)
    proc = subprocess.run(["bash", "-c", plan.trainer_script], capture_output=True, text=True, timeout=30,
                          env={"PATH": os.environ["PATH"], "TMPDIR": str(tmp_path)})
    assert proc.returncode == status, proc.stderr
    assert (tmp_path / "trainer-ran").exists() == (finished == 1)
    assert ("stopped on request" in proc.stderr) == ("75" in trainer or "MARKER" in trainer)


def test_trainer_script_bypasses_proxies_for_the_servers(tmp_path):
    _, plan = _plan()
    line = next(x for x in plan.trainer_script.splitlines() if x.startswith("export NO_PROXY="))
    env = {"PATH": os.environ["PATH"], "S2LPO_LEARNER_SERVER_HOST": "n3", "S2LPO_EXPLORER_HOST": "n4",
           "no_proxy": "localhost"}
    out = subprocess.run(["bash", "-c", f'{line}; printf "%s|%s" "$NO_PROXY" "$no_proxy"'], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert out == "n3,n4|localhost,n3,n4"


@pytest.mark.timeout(30)
def test_wait_healthy_never_goes_through_an_inherited_proxy(health_server, monkeypatch):
    url, _ = health_server
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:1")  # nothing listens: through it, every probe fails
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert probe_health(url) == (True, "HTTP 200")


def test_fp8_learner_servers_start_from_the_block_fp8_copy(tmp_path):
    args = "rollout.learner.extra_args=[--quantization, fp8]"
    cfg, plan = _plan([args])
    learner, explorer = plan.servers
    flags = learner.command[learner.command.index("--model-path") + 1]
    assert flags == "/models/Qwen3-8B-Base-fp8" and learner.command[-2:] == ["--quantization", "fp8"]
    assert "/models/Qwen3-1.7B-Base" in explorer.command  # frozen servers keep their checkpoint
    model = tmp_path / "Qwen3-8B-Base"  # a model path visible here: its FP8 copy must exist
    model.mkdir()
    with pytest.raises(ValueError, match=f"s2lpo convert hf-to-fp8 --hf {model} --out {model}-fp8"):
        _plan([args, f"rollout.learner.model_path={model}"])
    (tmp_path / "Qwen3-8B-Base-fp8").mkdir()
    (tmp_path / "Qwen3-8B-Base-fp8" / "config.json").write_text("{}")
    assert f"{model}-fp8" in _plan([args, f"rollout.learner.model_path={model}"])[1].servers[0].command
