"""What a cluster launch runs, as plain data: node groups, server commands, the trainer script.

Pure Python (no nemo_run): `plan_launch` turns a `RunConfig` and a `ClusterLayout` into a
`LaunchPlan` that `launch/experiment.py` maps onto NeMo-Run executors (Slurm, local, Docker).

Node groups (one Slurm heterogeneous-job component each, in this order):

  learner         torchrun over `num_nodes` nodes; global rank 0 on the group's first node.
                  A colocated learner server runs on that first node too (CUDA IPC sync).
  learner_server  the learner's SGLang server(s) on their own node (NCCL or disk weight sync).
  explorer        the frozen explorer's SGLang server(s) on their own node (S2L-PO: algo.t_mix > 0).
  teacher         the frozen teacher's SGLang server(s) on their own node (algo.method forward_kl / opd).

`rollout.<engine>.replicas: N` puts N servers on the role's node, one task: replica i listens on
the role's port + 100 * i (REPLICA_PORT_STRIDE: the roles' default ports stay apart) and runs on
GPUs i*tp .. (SGLang --base-gpu-id), and the trainer attaches to all of them
(`rollout.<engine>.urls`).

A multi-stage recipe (`stages:`) gets the learner group only: its engines change from stage to
stage (a stage's trained model is the next one's teacher), so engines with `backend: sglang`
are launched by each stage's trainer on the learner's first node (docs/cluster.md).

Hosts are shell expressions (`${S2LPO_EXPLORER_HOST}` on Slurm, `127.0.0.1` on one machine):
the URLs and the NCCL rendezvous reach the trainer as dotted overrides that the shell expands
at run time, so nothing about the allocation must be known when the job is written.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field

from ..config import EngineConfig, RunConfig
from ..rollout.sglang_python import sglang_python_expr
from ..rollout.sglang_server import CPU_THREADS_BIND_ENV, build_launch_command, launch_env
from ..trainer.stop_signal import CONTINUE_EXIT_CODE, STOP_MARKER_ENV
from .memory import check_launch_memory

LEARNER, LEARNER_SERVER, EXPLORER, TEACHER = "learner", "learner_server", "explorer", "teacher"
REPLICA_PORT_STRIDE = 100  # replica i of a role listens on the role's port + i * stride
# The resolved config as the trainer script writes it. In a Slurm job: beside the job's scripts
# and logs (the task's working directory is NeMo-Run's job directory, shared storage), one file
# per node, kept with the job's record: nothing is left on the nodes, even when Slurm SIGKILLs
# the task. Elsewhere (one machine): a fresh temporary file, removed when the script ends.
CONFIG_VAR = "S2LPO_CONFIG"
EMBEDDED_CONFIG_PATH = "${" + CONFIG_VAR + "}"
# Where: the task's working directory in a Slurm job, else $TMPDIR; then the stop marker of the
# trainer (stop_signal.py) and the config file.
_WORK_DIR_LINE = 'if [ -n "${SLURM_JOB_ID:-}" ]; then s2lpo_dir="$PWD"; else s2lpo_dir="${TMPDIR:-/tmp}"; fi'
_MARKER_LINE = (f'export {STOP_MARKER_ENV}="$s2lpo_dir/s2lpo-stopped-${{SLURM_JOB_ID:-local}}-${{SLURM_NODEID:-0}}-$$"')
_CONFIG_LINE = (f'if [ -n "${{SLURM_JOB_ID:-}}" ]; then {CONFIG_VAR}="$s2lpo_dir/s2lpo-config-${{SLURM_JOB_ID}}-'
                f'${{SLURM_NODEID:-0}}.yaml"; else {CONFIG_VAR}="$(mktemp "$s2lpo_dir/s2lpo-config.XXXXXX")"; fi')
CONFIG_EOF = "S2LPO_CONFIG_EOF"
# Set by the trainer script's SIGTERM trap: the job is being cancelled or preempted.
TERM_FLAG = "s2lpo_terminated"
_STOP_IF_TERMINATED = f'if [ -n "${{{TERM_FLAG}:-}}" ]; then echo "s2lpo: terminated before the trainer started" >&2; exit 143; fi'
# Servers placed on other nodes listen on every interface, so each job gets a random key that
# every server it launches requires and the trainer sends. Made when the job starts (the sbatch
# script's setup), it is written nowhere: scripts and dry runs show only the variable's name,
# and the shell's trace (NeMo-Run's script runs under `set -x`) is off while it is made.
API_KEY_VAR = "S2LPO_API_KEY"
API_KEY_SETUP = ('{ s2lpo_xtrace="${-//[^x]/}"; set +x; } 2>/dev/null; '
                 f'export {API_KEY_VAR}="${{{API_KEY_VAR}:-$(od -An -N32 -tx1 /dev/urandom | tr -d \' \\n\')}}"; '
                 '[ -z "$s2lpo_xtrace" ] || set -x')
DEFAULT_ENV = {
    "NCCL_DEBUG": "WARN",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",  # megatron-core's TP comm/compute overlap needs it
    "PYTHONUNBUFFERED": "1",
}


def slurm_host(group: str) -> str:
    """The shell variable holding a node group's first host on Slurm (set by the sbatch script)."""
    return "${" + host_var(group) + "}"


def host_var(group: str) -> str:
    return f"S2LPO_{group.upper()}_HOST"


def local_host(group: str) -> str:
    return "127.0.0.1"


@dataclass(kw_only=True, slots=True)
class ClusterLayout:
    """How a run is spread over machines; everything here is a launch choice, not training."""

    num_nodes: int = 1
    gpus_per_node: int = 8
    # None: from the config (sync.transport=tensor -> colocated, otherwise a node of its own)
    colocate_learner_server: bool | None = None
    learner_port: int = 30000
    explorer_port: int = 30001
    teacher_port: int = 30002
    torchrun_port: int = 29500
    sync_port: int = 29600  # NCCL weight-sync rendezvous (sync.master_port)
    health_timeout_s: float = 1800.0
    # run.resume=true: a requeued (preempted) job continues from the newest checkpoint; a first
    # start finds none and starts fresh.
    resume: bool = True
    python: str = "python"  # the trainer's interpreter inside the container / on the node
    # Shell lines every task script (trainer and servers) runs first: outside a container, the
    # activation of the environment the job runs in (`--venv`); "" in the image.
    activate: str = ""
    # The servers' interpreter; "" = the SGLang interpreter rule (rollout/sglang_python.py),
    # resolved on the node: the image keeps SGLang in its own environment (Dockerfile).
    server_python: str = ""
    # What the trainer's own environment provides to the weight-sync transports (sync/transports.py
    # trainer_needs): the image gives CUDA and keeps SGLang out of the trainer's environment.
    trainer_provides: tuple[str, ...] = ("cuda",)
    gpu_memory_gb: float = 80.0  # the memory check (launch/memory.py) sizes the recipe for these GPUs
    allow_over_budget: bool = False  # launch even when the memory check refuses the recipe

    def __post_init__(self) -> None:
        if self.num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {self.num_nodes}")
        if self.gpus_per_node < 0:
            raise ValueError(f"gpus_per_node must be >= 0 (0 = CPU only), got {self.gpus_per_node}")
        ports = (self.learner_port, self.explorer_port, self.teacher_port, self.torchrun_port, self.sync_port)
        if len(set(ports)) != len(ports):
            raise ValueError(f"learner_port, explorer_port, teacher_port, torchrun_port and sync_port must differ, "
                             f"got {ports}")
        if self.health_timeout_s <= 0:
            raise ValueError(f"health_timeout_s must be > 0, got {self.health_timeout_s}")
        self.server_python = self.server_python or sglang_python_expr(self.python)


@dataclass(kw_only=True, slots=True)
class NodeGroup:
    name: str  # LEARNER | LEARNER_SERVER | EXPLORER | TEACHER
    num_nodes: int
    gpus_per_node: int  # GPUs requested per node of this group


@dataclass(kw_only=True, slots=True)
class ServerTask:
    name: str  # "learner_server" | "explorer_server" | "teacher_server"
    group: str  # node group it runs in (LEARNER when colocated)
    num_gpus: int  # replicas * tp_size * dp_size
    command: list[str]  # sglang.launch_server command line of replica 0 (build_launch_command)
    url: str  # replica 0 as the trainer reaches it (host may be a shell expression)
    commands: list[list[str]] = field(default_factory=list)  # every replica's command line
    urls: list[str] = field(default_factory=list)  # every replica's URL
    env: dict[str, str] = field(default_factory=dict)  # exported before the servers start, unless set


@dataclass(kw_only=True, slots=True)
class LaunchPlan:
    groups: list[NodeGroup]
    servers: list[ServerTask]
    learner_nodes: int
    learner_procs_per_node: int
    colocated: bool
    trainer_overrides: list[str]  # generated: URLs, rendezvous, transport, resume
    trainer_script: str  # bash: wait for every server's /health, then torchrun the trainer
    env: dict[str, str] = field(default_factory=dict)
    setup_lines: list[str] = field(default_factory=list)  # run once per job before any task (API key)
    activate: str = ""  # first lines of every task script (ClusterLayout.activate)

    def group(self, name: str) -> NodeGroup:
        return next(g for g in self.groups if g.name == name)


def _needs_server(engine: EngineConfig) -> bool:
    return engine.backend == "sglang" and not engine.attached


def _server_cfg(engine: EngineConfig, port: int, *, memory_saver: bool, one_machine: bool) -> EngineConfig:
    # On a cluster listen on every interface (the trainer is on another node), behind the job's
    # key, which SGLang reads from the job's environment (not from its command line, which every
    # user of the node can read: sglang_server.API_KEY_ENV); a configured launch_command is kept
    # and gets the key as --api-key. On one machine only on loopback.
    key = ({"api_key": "${" + API_KEY_VAR + "}"} if engine.launch_command else
           {"api_key": "", "api_key_env": API_KEY_VAR})
    host = {"host": "127.0.0.1"} if one_machine else {"host": "0.0.0.0", **key}
    return dataclasses.replace(engine, port=port, enable_memory_saver=engine.enable_memory_saver or memory_saver,
                               **host)


def _auth_overrides(name: str, one_machine: bool) -> list[str]:
    """The trainer reads a launched server's key from the job's environment, never its argv."""
    return [] if one_machine else [f"rollout.{name}.api_key=", f"rollout.{name}.api_key_env={API_KEY_VAR}"]


def _server_gpus(engine: EngineConfig, name: str, layout: ClusterLayout) -> int:
    num_gpus = engine.replicas * engine.tp_size * engine.dp_size
    if layout.gpus_per_node and num_gpus > layout.gpus_per_node:
        raise ValueError(f"rollout.{name}: replicas*tp_size*dp_size = {num_gpus} GPUs does not fit one node of "
                         f"{layout.gpus_per_node} GPUs; the launcher runs an engine's servers on one node")
    return num_gpus


def _server_task(engine: EngineConfig, name: str, group: str, port: int, host: str, num_gpus: int,
                 cfg: RunConfig, python: str, *, memory_saver: bool, one_machine: bool) -> ServerTask:
    """The role's servers: replica i on port + i * stride and its own GPUs (--base-gpu-id i*tp*dp)."""
    ports = [port + i * REPLICA_PORT_STRIDE for i in range(engine.replicas)]
    if name == "learner":
        engine = _fp8_server_model(engine)
    # A recipe's base_gpu_id places a server beside another on one machine; on a node of its own
    # every GPU of the node is the server's, so its devices start at 0. The CPU profile still
    # binds the recipe's cores there: device d -> core base_gpu_id + d (the emulated nodes of the
    # Slurm tier share one machine's cores).
    own_node = not one_machine and group != LEARNER
    first_core = engine.base_gpu_id if own_node else 0
    server = _server_cfg(dataclasses.replace(engine, ports=ports, base_gpu_id=0 if own_node else engine.base_gpu_id),
                         port, memory_saver=memory_saver, one_machine=one_machine)
    commands = [build_launch_command(server, python=python, replica=i, seed=cfg.run.seed)
                for i in range(engine.replicas)]
    urls = [f"http://{host}:{p}" for p in ports]
    # the CPU profile binds each replica's threads (sglang_server.launch_env), device d -> core d
    cores = list(range(first_core, engine.base_gpu_id + (num_gpus or 1)))
    env = launch_env(server, cores=cores) or {}
    env = {CPU_THREADS_BIND_ENV: env[CPU_THREADS_BIND_ENV]} if CPU_THREADS_BIND_ENV in env else {}
    return ServerTask(name=f"{name}_server", group=group, num_gpus=num_gpus, command=commands[0], url=urls[0],
                      commands=commands, urls=urls, env=env)


def _fp8_server_model(engine: EngineConfig) -> EngineConfig:
    """A learner server with `--quantization fp8` starts from the block-FP8 copy `<model_path>-fp8`
    (the learner itself trains from model_path; docs/sync.md, "FP8 engines"). Where model_path is
    readable here, the copy must exist too."""
    import os

    from ..config.learner import engine_precision
    from ..convert.fp8 import fp8_copy_path

    if engine_precision(engine) != "fp8":
        return engine
    fp8 = fp8_copy_path(engine.model_path)
    if os.path.isdir(engine.model_path) and not os.path.isfile(os.path.join(fp8, "config.json")):
        raise ValueError(f"rollout.learner runs SGLang with --quantization fp8, so its servers start from a block-FP8 "
                         f"copy of {engine.model_path} at {fp8}, which does not exist: write it once with "
                         f"`s2lpo convert hf-to-fp8 --hf {engine.model_path} --out {fp8}`")
    return dataclasses.replace(engine, model_path=fp8)


def _url_override(name: str, server: ServerTask) -> str:
    if len(server.urls) == 1:
        return f"rollout.{name}.url={server.url}"
    return f"rollout.{name}.urls=[" + ",".join(server.urls) + "]"


def plan_launch(cfg: RunConfig, config_path: str, layout: ClusterLayout, *,
                host: Callable[[str], str] = slurm_host, user_overrides: tuple[str, ...] = (),
                embed_config: bool = True, one_machine: bool = False) -> LaunchPlan:
    """Split `layout.num_nodes` between learner and servers; build commands and overrides.

    `cfg` is `config_path` with `user_overrides` applied. With `embed_config` the trainer script
    carries the resolved YAML itself (a heredoc), so the job does not depend on the recipe file
    being readable on the cluster; otherwise it passes `config_path` and the overrides.
    `one_machine`: servers share the learner's machine (local / Docker) and take no node.
    """
    colocated = (cfg.sync.transport == "tensor" if layout.colocate_learner_server is None
                 else layout.colocate_learner_server)
    learner_engine, explorer_engine = cfg.rollout.learner, cfg.rollout.explorer
    servers: list[ServerTask] = []
    groups: list[NodeGroup] = []
    overrides: list[str] = []
    if _needs_server(learner_engine):
        group = LEARNER if colocated else LEARNER_SERVER
        num_gpus = _server_gpus(learner_engine, "learner", layout)
        server = _server_task(learner_engine, "learner", group, layout.learner_port, host(group), num_gpus, cfg,
                              layout.server_python, memory_saver=colocated, one_machine=one_machine)
        servers.append(server)
        overrides += [_url_override("learner", server), *_auth_overrides("learner", one_machine)]
        if colocated:
            overrides += ["sync.transport=tensor", "rollout.learner.enable_memory_saver=true"]
        elif cfg.sync.transport != "disk":  # disk stays disk (shared storage); else NCCL broadcast
            if learner_engine.dp_size > 1:
                raise ValueError(f"rollout.learner.dp_size={learner_engine.dp_size}: SGLang refuses NCCL weight "
                                 "updates for dp_size > 1; run several servers instead (rollout.learner.replicas: N "
                                 "with dp_size 1: one update group reaches all), or sync through shared storage "
                                 "(sync.transport=disk)")
            overrides += ["sync.transport=distributed", f"sync.master_address={host(LEARNER)}",
                          f"sync.master_port={layout.sync_port}"]
        if not colocated and not one_machine:
            groups.append(NodeGroup(name=LEARNER_SERVER, num_nodes=1, gpus_per_node=num_gpus))
    if learner_engine.backend == "sglang":
        check_trainer_environment(_sync_transport(cfg, overrides), layout)
    frozen = [(EXPLORER, explorer_engine, layout.explorer_port, cfg.algo.t_mix > 0),
              (TEACHER, cfg.rollout.teacher, layout.teacher_port, cfg.algo.method in ("forward_kl", "opd"))]
    for name, engine, port, used in frozen:  # frozen models: a server on a node of its own
        if not (used and _needs_server(engine) and engine.model_path):
            continue
        num_gpus = _server_gpus(engine, name, layout)
        server = _server_task(engine, name, name, port, host(name), num_gpus, cfg, layout.server_python,
                              memory_saver=False, one_machine=one_machine)
        servers.append(server)
        overrides += [_url_override(name, server), *_auth_overrides(name, one_machine)]
        if not one_machine:
            groups.append(NodeGroup(name=name, num_nodes=1, gpus_per_node=num_gpus))
    _check_ports(servers, one_machine)
    learner_nodes = layout.num_nodes - sum(g.num_nodes for g in groups)
    if learner_nodes < 1:
        raise ValueError(f"num_nodes={layout.num_nodes} leaves no node for the learner: the servers take "
                         f"{layout.num_nodes - learner_nodes}; ask for more nodes")
    procs = _learner_procs_per_node(cfg, layout, learner_nodes)
    check_launch_memory(cfg, learner_gpus=learner_nodes * layout.gpus_per_node, gpus_per_node=layout.gpus_per_node,
                        gpu_memory_gb=layout.gpu_memory_gb, allow_over_budget=layout.allow_over_budget,
                        colocated=colocated)
    groups.insert(0, NodeGroup(name=LEARNER, num_nodes=learner_nodes, gpus_per_node=layout.gpus_per_node))
    if layout.resume:
        overrides.append("run.resume=true")
    script = trainer_script(config_path, [] if embed_config else list(user_overrides), overrides,
                            servers=servers, layout=layout, learner_nodes=learner_nodes, procs_per_node=procs,
                            master_host=host(LEARNER), config_text=cfg.to_yaml() if embed_config else None)
    return LaunchPlan(groups=groups, servers=servers, learner_nodes=learner_nodes, learner_procs_per_node=procs,
                      colocated=colocated and _needs_server(learner_engine),
                      trainer_overrides=overrides, trainer_script=script, env=dict(DEFAULT_ENV),
                      setup_lines=[API_KEY_SETUP] if servers and not one_machine else [], activate=layout.activate)


def _sync_transport(cfg: RunConfig, overrides: list[str]) -> str:
    """sync.transport as the trainer will see it (the last generated override wins)."""
    chosen = [o.split("=", 1)[1] for o in overrides if o.startswith("sync.transport=")]
    return chosen[-1] if chosen else cfg.sync.transport


def check_trainer_environment(transport: str, layout: ClusterLayout) -> None:
    """Refuse, before anything is submitted, a weight sync that the trainer's environment cannot run
    (what each transport needs is declared by its class: sync/transports.py `trainer_needs`)."""
    from ..sync.transports import trainer_needs

    missing = [need for need in trainer_needs(transport) if need not in layout.trainer_provides]
    if not missing:
        return
    colocated = " (a learner server colocated with the learner)" if transport == "tensor" else ""
    raise ValueError(
        f"sync.transport={transport}{colocated} needs {' and '.join(missing)} in the trainer's own environment, "
        f"which this launch's trainer does not have (it provides: {', '.join(layout.trainer_provides) or 'nothing'}; "
        "the image keeps SGLang in /opt/sglang, apart from the trainer's torch). Give the learner server a node "
        "of its own (--no-colocate: sync.transport=distributed, NCCL) or sync through shared storage "
        "(sync.transport=disk); if your trainer environment has them, say so with --trainer-provides "
        f"{','.join(dict.fromkeys([*layout.trainer_provides, *missing]))}")


def _check_ports(servers: list[ServerTask], one_machine: bool) -> None:
    """Servers that share a host (one machine, or colocated replicas) need their own ports."""
    seen: dict[tuple[str, str], str] = {}
    for server in servers:
        for i, url in enumerate(server.urls):
            where = url.rsplit(":", 1)
            key = ("", where[1]) if one_machine else (where[0], where[1])
            owner = f"{server.name} replica {i}"
            if key in seen:
                raise ValueError(f"{seen[key]} and {owner} would both listen on port {where[1]}: replica i of a "
                                 f"role uses the role's port + {REPLICA_PORT_STRIDE} * i; give learner_port, "
                                 "explorer_port and teacher_port distinct values")
            seen[key] = owner


def _learner_procs_per_node(cfg: RunConfig, layout: ClusterLayout, learner_nodes: int) -> int:
    """One process per GPU (one per node on CPU); the world size must hold whole TP*PP blocks."""
    procs = layout.gpus_per_node or 1
    model_parallel = cfg.learner.tensor_parallel_size * cfg.learner.pipeline_parallel_size
    world = procs * learner_nodes
    if world % model_parallel:
        raise ValueError(f"the learner's {learner_nodes} node(s) x {procs} processes = {world} is not a multiple of "
                         f"learner.tensor_parallel_size*pipeline_parallel_size = {model_parallel}; change the "
                         "node count or the parallel layout")
    return procs


def _expandable(arg: str) -> str:
    """Double-quote `arg` so that `${VAR}` expands but nothing else is interpreted."""
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`")
    return f'"{escaped}"'


def trainer_script(config_path: str, user_overrides: list[str], generated: list[str], *,
                   servers: list[ServerTask], layout: ClusterLayout, learner_nodes: int,
                   procs_per_node: int, master_host: str, config_text: str | None = None) -> str:
    """Bash run on every learner node: health gate, then the trainer (torchrun when > 1 process).

    The trainer stops on SIGUSR1 / SIGTERM after checkpointing its current step (stop_signal.py);
    the script then exits 0 (the job did its part; a chained job or a resubmission resumes), and
    with the trainer's own status otherwise.
    """
    # The stop request reaches every process of the job step; the trainer processes take it,
    # this shell and torchrun (whose default for SIGUSR1 is to die) ignore it. SIGTERM (scancel,
    # preemption) also reaches the trainer, which checkpoints its step: this shell must outlive
    # it rather than die at once (a trap, unlike '', leaves the children's SIGTERM as it was),
    # and once asked to stop it starts nothing new.
    lines = ["set -euo pipefail", "trap '' USR1", f"trap '{TERM_FLAG}=1' TERM"]
    if layout.activate:
        lines.append(layout.activate)
    # torchrun reports a worker's non-zero exit as its own 1: the trainer writes this marker instead
    lines += [_WORK_DIR_LINE, _MARKER_LINE]
    cleanup = f'rm -f "${STOP_MARKER_ENV}"'
    if config_text is not None:
        assert CONFIG_EOF not in config_text
        config_path = EMBEDDED_CONFIG_PATH
        lines.append(_CONFIG_LINE)
        cleanup += f'; [ -n "${{SLURM_JOB_ID:-}}" ] || rm -f "${CONFIG_VAR}"'  # a job keeps its record
    # nothing stays in the node's $TMPDIR, however the script ends (TERM is trapped above)
    lines.append(f"trap '{cleanup}' EXIT")
    if config_text is not None:
        lines += [f"cat > \"{config_path}\" <<'{CONFIG_EOF}'", config_text.rstrip("\n"), CONFIG_EOF]
    config_args = [_expandable(config_path) if config_text is not None else shlex.quote(config_path)]
    config_args += [shlex.quote(o) for o in user_overrides]
    python = shlex.quote(layout.python)
    if layout.resume:  # a chained job after the last step: done before waiting for the servers
        lines.append(f"if {python} -m megatron_s2lpo.launch.run_state {' '.join(config_args)}; then exit 0; fi")
        lines.append(_STOP_IF_TERMINATED)
    if servers:
        hosts = ",".join(dict.fromkeys(_url_host(url) for s in servers for url in (s.urls or [s.url])))
        lines.append(f'export NO_PROXY="${{NO_PROXY:+$NO_PROXY,}}{hosts}" no_proxy="${{no_proxy:+$no_proxy,}}{hosts}"')
        urls = " ".join(_expandable(url) for s in servers for url in (s.urls or [s.url]))
        lines.append(f"{python} -m megatron_s2lpo.launch.wait_healthy "
                     f"--timeout-s {layout.health_timeout_s:g} {urls}")
        lines.append(_STOP_IF_TERMINATED)
    args = ["-m", "megatron_s2lpo.cli", "train", *config_args, *(_expandable(o) for o in generated)]
    if learner_nodes * procs_per_node == 1:
        command = f"{python} " + " ".join(args)
    else:
        node_rank = "${SLURM_NODEID:-0}" if learner_nodes > 1 else "0"
        # torch's launcher through the named interpreter: a bare `torchrun` is whatever PATH holds
        # on the node (nothing at sites that start jobs with --export=NONE outside a container)
        command = (f"{python} -m torch.distributed.run --nnodes {learner_nodes} "
                   f"--nproc-per-node {procs_per_node} --node-rank {node_rank} --master-addr {_expandable(master_host)} "
                   f"--master-port {layout.torchrun_port} " + " ".join(args))
    return "\n".join(lines + _run_trainer(command)) + "\n"


def _run_trainer(command: str) -> list[str]:
    """Run the trainer and map "stopped on request" (stop_signal.py) to success."""
    return [
        f'rm -f "${STOP_MARKER_ENV}"',
        "status=0",
        f"{command} || status=$?",
        f'if [ -e "${STOP_MARKER_ENV}" ]; then status={CONTINUE_EXIT_CODE}; rm -f "${STOP_MARKER_ENV}"; fi',
        f'if [ "$status" -eq {CONTINUE_EXIT_CODE} ]; then',
        '  echo "s2lpo: the trainer checkpointed its step and stopped on request; resuming continues the run" >&2',
        "  exit 0",
        "fi",
        'exit "$status"',
    ]


def _url_host(url: str) -> str:
    """The host of `http://host:port` (kept verbatim: it may be a shell expression)."""
    return url.split("://", 1)[-1].rsplit(":", 1)[0]


def _quote(arg: str) -> str:
    return _expandable(arg) if "${" in arg else shlex.quote(arg)


def server_script(server: ServerTask, activate: str = "") -> str:
    """One server: exec it. Several replicas: start each in the background and wait for all (a
    replica that exits leaves the others serving; the trainer stops sending to it). `activate`:
    the environment's activation lines (LaunchPlan.activate), first."""
    commands = server.commands or [server.command]
    prelude = [activate] if activate else []
    prelude += [f'export {k}="${{{k}:-{v}}}"' for k, v in server.env.items()]
    if len(commands) == 1:
        return "\n".join(["set -euo pipefail", *prelude, "exec " + " ".join(_quote(a) for a in commands[0])]) + "\n"
    lines = ["set -uo pipefail", *prelude, "trap 'kill 0' TERM INT"]
    lines += [" ".join(_quote(a) for a in command) + " &" for command in commands]
    lines.append("wait")
    return "\n".join(lines) + "\n"


def num_gpus_summary(plan: LaunchPlan) -> dict[str, int]:
    """GPUs per role (learner, learner server when on its own node, explorer / teacher server)."""
    out = {"learner": plan.learner_nodes * plan.group(LEARNER).gpus_per_node}
    for server in plan.servers:
        out[server.name] = server.num_gpus
    return out

