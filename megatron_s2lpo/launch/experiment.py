"""NeMo-Run experiments for a run: Slurm (one heterogeneous job), one machine, or Docker.

    exp, plan = build_slurm_experiment(cfg, "examples/qwen3_8b_explorer_1p7b.yaml",
                                       ClusterLayout(num_nodes=4), SlurmOptions(account=..., ...))
    print(render_slurm(exp).sbatch)        # the sbatch script, nothing submitted
    with exp:
        exp.run(detach=True)               # submit

Tasks (NeMo-Run `Script`s, in this order, which is also the `-<i>` suffix of their log files):
a colocated learner server (when the learner server shares the learner's first node), the
trainer, the learner's own-node server, the explorer server. On Slurm they are sruns of one
heterogeneous job: component 0 = learner nodes, then one component per server node. The sbatch
script resolves each component's first host with `scontrol show hostnames` (outside the
container, where scontrol exists) and exports it as S2LPO_<GROUP>_HOST; the trainer's overrides
reference those variables. The batch shell passes Slurm's early SIGUSR1 (`--signal`) to the
trainer's srun (launch/sbatch.py); `max_chained_jobs` adds copies of the job that start after the
previous one ended (afterany) and resume the run. On one machine (local, Docker) the experiment
has one task, the supervisor (launch/supervisor.py), which runs the same scripts.
nemo_run is imported only inside these functions.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shlex
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

from ..config import RunConfig
from .plan import LEARNER, ClusterLayout, LaunchPlan, host_var, local_host, plan_launch, server_script, slurm_host
from .sbatch import MONITOR_PERIOD_S, STAGGER_S, job_end_trap, parse_sbatch_args, quoted_env, stop_signal_trap
from .supervisor import SupervisedServer, SupervisorSpec
from .walltime import (MAX_SIGNAL_LEAD_S, LaunchWarning, check_walltime, default_signal_lead, host_path,
                       measured_step_time, parse_slurm_time, startup_allowance)


SUPERVISOR = "supervisor"  # the one task of a local or Docker run
SERVER_LOGS = "server_logs"  # under run.output_dir: <name>.log per server of a local or Docker run


@dataclass(kw_only=True, slots=True)
class SlurmOptions:
    """Where and how the job runs on the cluster (nothing here changes the training)."""

    account: str
    partition: str
    time: str  # the job's time limit (Slurm format): explicit, or the partition's maximum (walltime.py)
    # The image every task runs in (pyxis); "" runs on the nodes as they are, in the environment
    # ClusterLayout names (python / activate: --venv, --python), and no pyxis option is written.
    container_image: str = ""
    container_mounts: list[str] = field(default_factory=list)  # "host_path:container_path" (image only)
    job_dir: str = ""  # sbatch script and logs, on storage the login node writes ("" = ~/.nemo_run)
    ssh_host: str = ""  # submit over SSH from a workstation; empty: run on a login node
    ssh_user: str = ""
    env: dict[str, str] = field(default_factory=dict)  # extra environment, e.g. NCCL_SOCKET_IFNAME
    # requeues after a failure that another try may not meet (not a usage error, exit 2); the
    # trainer resumes from its last checkpoint
    max_retries: int = 0
    exclusive: bool = True
    mem: str = "0"  # all of each node's memory (with --exclusive Slurm grants only the default otherwise)
    qos: str = ""
    constraint: str = ""
    gres: str = ""
    reservation: str = ""
    sbatch_args: list[str] = field(default_factory=list)  # raw sbatch options, "KEY=VALUE" or "KEY"
    mount_home: bool = False  # pyxis mounts $HOME by default: a user's ~/.local would shadow the image's packages
    # SIGUSR1 this many seconds before the time limit (the trainer checkpoints and stops);
    # None: one step plus a checkpoint (walltime.default_signal_lead); 0: no signal.
    signal_lead_s: int | None = None
    max_chained_jobs: int = 0  # follow-up jobs (afterany), each resuming from the last checkpoint
    step_time_s: float = 0.0  # stated seconds per step when no earlier job measured one; 0 = unknown
    # Seconds a job takes before its first step (servers loading, the trainer building); None:
    # walltime.startup_allowance (10 min, less for a short job)
    startup_s: int | None = None

    def __post_init__(self) -> None:
        for name, flag in (("account", "--account"), ("partition", "--partition")):
            if not getattr(self, name):
                raise ValueError(f"Slurm {name.replace('_', ' ')} is empty: pass {flag}")
        if parse_slurm_time(self.time) is None:
            raise ValueError(f"--time {self.time!r}: the job needs a finite time limit")
        if self.container_mounts and not self.container_image:
            raise ValueError(f"container mounts {self.container_mounts} without --container-image: outside a "
                             "container the job sees the nodes' own paths; drop --mounts")
        if self.startup_s is not None and self.startup_s < 0:
            raise ValueError(f"--startup-time must be >= 0 seconds, got {self.startup_s}")
        for mount in self.container_mounts:
            if ":" not in mount:
                raise ValueError(f"container mount {mount!r} must look like /host/path:/container/path")
        if self.ssh_host and not (self.ssh_user and self.job_dir):
            raise ValueError("submitting over SSH (ssh_host) needs ssh_user and job_dir on the cluster")
        if self.signal_lead_s is not None and not 0 <= self.signal_lead_s <= MAX_SIGNAL_LEAD_S:
            raise ValueError(f"--signal-lead must be in 0..{MAX_SIGNAL_LEAD_S} seconds (sbatch's limit), "
                             f"got {self.signal_lead_s}")
        if self.max_chained_jobs < 0 or self.max_retries < 0:
            raise ValueError("--max-chained-jobs and --retries must be >= 0")
        quoted_env(self.env)  # names checked now, values quoted when the script is written
        parse_sbatch_args(self.sbatch_args)


@dataclass(kw_only=True, slots=True)
class RenderedLaunch:
    sbatch: str  # the sbatch script NeMo-Run would submit
    scripts: dict[str, str]  # task scripts the sruns execute, by file name (`<title>-<i>.sh`)
    chained: list[str] = field(default_factory=list)  # sbatch scripts of the chained jobs, in order


def _script(body: str) -> Any:
    import nemo_run as run

    return run.Script(inline=body)


def _tasks(plan: LaunchPlan) -> list[tuple[str, str, Any]]:
    """(role, node group, script body) in launch order; the colocated server precedes the trainer."""
    colocated = [s for s in plan.servers if s.group == LEARNER]
    others = [s for s in plan.servers if s.group != LEARNER]
    tasks = [(s.name, s.group, server_script(s, plan.activate)) for s in colocated]
    tasks.append(("trainer", LEARNER, plan.trainer_script))
    tasks += [(s.name, s.group, server_script(s, plan.activate)) for s in others]
    return tasks


def _check_environment(opts: SlurmOptions, layout: ClusterLayout) -> None:
    """Without an image the job runs in the environment the user names, by absolute path: a bare
    `python` is whatever the node's PATH holds (nothing under --export=NONE)."""
    if opts.container_image or os.path.isabs(layout.python):
        return
    raise ValueError("without --container-image the job runs on the nodes as they are: name its environment with "
                     "--venv DIR (a virtual environment on storage every node reads) or --python PATH (its "
                     f"interpreter), got python={layout.python!r}")


def _host_exports(plan: LaunchPlan, heterogeneous: bool) -> str:
    lines = []
    for index, group in enumerate(plan.groups):
        nodelist = f"$SLURM_JOB_NODELIST_HET_GROUP_{index}" if heterogeneous else "$SLURM_JOB_NODELIST"
        lines.append(f'export {host_var(group.name)}=$(scontrol show hostnames "{nodelist}" | head -n1)')
    return "\n".join(lines)


def build_slurm_experiment(cfg: RunConfig, config_path: str, layout: ClusterLayout, opts: SlurmOptions, *,
                           title: str = "", user_overrides: tuple[str, ...] = (),
                           base_dir: str | None = None) -> tuple[Any, LaunchPlan]:
    """A NeMo-Run experiment holding one Slurm job (heterogeneous when servers have own nodes),
    and `opts.max_chained_jobs` copies of it that each start after the previous one ended."""
    import nemo_run as run

    if opts.max_chained_jobs and not layout.resume:
        raise ValueError("chained jobs continue the run from its last checkpoint: drop --no-resume")
    _check_environment(opts, layout)
    if not os.path.isabs(cfg.run.output_dir):
        raise ValueError(f"run.output_dir={cfg.run.output_dir} is a relative path: the job runs in NeMo-Run's job "
                         "directory, not here; give an absolute path on storage every node and the login node "
                         f"share, e.g. run.output_dir=$PWD/{cfg.run.output_dir}")
    plan = plan_launch(cfg, config_path, layout, host=slurm_host, user_overrides=user_overrides)
    signal_lead = _check_walltime(cfg, opts)
    heterogeneous = len(plan.groups) > 1
    group_index = {g.name: i for i, g in enumerate(plan.groups)}
    if opts.ssh_host:  # NeMo-Run copies the experiment's directory to job_dir on the login node
        tunnel = run.SSHTunnel(host=opts.ssh_host, user=opts.ssh_user, job_dir=opts.job_dir)
    else:  # sbatch reads the scripts where the experiment writes them: one directory for both
        base_dir = opts.job_dir or base_dir
        tunnel = run.LocalTunnel(job_dir=os.path.join(base_dir, "experiments") if base_dir else "")
    tasks = _tasks(plan)
    env = {**plan.env, **opts.env}
    scripts, executors = [], []
    container = bool(opts.container_image)
    for role, group_name, body in tasks:
        group = plan.groups[group_index[group_name]]
        # pyxis's own option: a Slurm without pyxis refuses it
        srun_args = ["--no-container-mount-home"] if container and not opts.mount_home else []
        if plan.colocated and group_name == LEARNER:
            srun_args.append("--overlap")  # trainer and server steps share the node's GPUs
            if role != "trainer":  # one server, on the learner's first node (global rank 0)
                srun_args += ["--nodes=1", "--ntasks=1", f"--nodelist={slurm_host(LEARNER)}"]
        executors.append(run.SlurmExecutor(
            account=opts.account, partition=opts.partition, time=opts.time, nodes=group.num_nodes,
            ntasks_per_node=1, gpus_per_node=group.gpus_per_node or None, mem=opts.mem or None,
            qos=opts.qos or None, constraint=opts.constraint or None, gres=opts.gres or None,
            signal=f"B:USR1@{signal_lead}" if signal_lead else None,
            additional_parameters=_additional_sbatch(opts) or None,
            container_image=opts.container_image or None, container_mounts=list(opts.container_mounts),
            # pyxis keeps the image's value of a variable the image defines unless it is listed here
            container_env=sorted({*env, *(host_var(g.name) for g in plan.groups)}) if container else None,
            env_vars=quoted_env(env), srun_args=srun_args or None, heterogeneous=heterogeneous,
            # requeueing is job_end_trap's (NeMo-Run's requeues every failure, usage errors too)
            exclusive=opts.exclusive or None, retries=0, dependency_type="afterany",
            # the batch shell's loop looks at the sruns every few seconds, so the stop trap and the
            # job's end follow the trainer within seconds (sbatch.MONITOR_PERIOD_S)
            monitor_group_job_wait_time=MONITOR_PERIOD_S, wait_time_for_group_job=STAGGER_S,
            packager=run.Packager(), tunnel=tunnel))
        scripts.append(_script(body))
    main = executors[0]
    trainer_index = [role for role, _, _ in tasks].index("trainer")
    main.setup_lines = "\n".join([_host_exports(plan, heterogeneous), *plan.setup_lines,
                                   *([stop_signal_trap(trainer_index)] if signal_lead else []),
                                   job_end_trap([role for role, _, _ in tasks], opts.max_retries)])
    if heterogeneous:
        main.het_group_indices = [group_index[g] for _, g, _ in tasks]
    name = title or cfg.run.name
    # NeMo-Run's status comes from sacct, which a Slurm without accounting (slurmdbd) cannot
    # answer: it would print UNKNOWN warnings; submitted_jobs() reports from squeue instead.
    exp = _experiment(name, base_dir, skip_status=True)
    with exp:
        previous = exp.add(scripts, executor=executors, name=name)
        for i in range(1, opts.max_chained_jobs + 1):  # afterany: after a timeout, a failure or the end
            previous = exp.add(scripts, executor=executors, name=f"{name}-chain{i}", dependencies=[previous])
    return exp, plan


def _additional_sbatch(opts: SlurmOptions) -> dict[str, str | bool]:
    extra: dict[str, str | bool] = parse_sbatch_args(opts.sbatch_args)
    if opts.reservation:
        extra["reservation"] = opts.reservation
    return extra


def _check_walltime(cfg: RunConfig, opts: SlurmOptions) -> int:
    """The stop signal's lead in seconds (0: none), after checking the run against the walltime."""
    # outside a container the job sees the paths as they are: one identity "mount" of the root
    mounts = opts.container_mounts if opts.container_image else ["/:/"]
    if opts.container_image and host_path(cfg.run.output_dir, mounts) is None:
        warnings.warn(f"run.output_dir={cfg.run.output_dir} is under none of the container mounts "
                      f"{opts.container_mounts}: checkpoints written there end with the job's container",
                      LaunchWarning, stacklevel=3)
    measured = measured_step_time(os.path.abspath(cfg.run.output_dir) if not opts.container_image
                                  else cfg.run.output_dir, mounts)
    step_time, source = measured if measured else (opts.step_time_s, "stated for the recipe")
    if measured:
        source = f"measured in {source}"
    walltime = parse_slurm_time(opts.time) or 0
    lead = default_signal_lead(step_time) if opts.signal_lead_s is None else opts.signal_lead_s
    if opts.signal_lead_s is None:
        lead = min(lead, walltime // 2)
    startup = startup_allowance(walltime) if opts.startup_s is None else opts.startup_s
    check_walltime(save_every=cfg.run.save_every, num_steps=cfg.run.num_steps, walltime_s=walltime,
                   signal_lead_s=lead, step_time_s=step_time, source=source, startup_s=startup)
    return lead


def _experiment(title: str, base_dir: str | None, *, skip_status: bool = False) -> Any:
    import nemo_run as run

    kwargs = {"base_dir": base_dir} if base_dir else {}
    return run.Experiment(title, log_level="WARN", skip_status_at_exit=skip_status, **kwargs)


def render_slurm(exp: Any, *, keep_files: bool = False) -> RenderedLaunch:
    """NeMo-Run's dry run of a Slurm experiment: the sbatch scripts and task scripts, not submitted.

    A chained job's `--dependency=afterany:<job id>` is not in its script: NeMo-Run passes it on
    the sbatch command line at submission, once the previous job's id is known.
    """
    with exp:
        exp.dryrun(log=False, exist_ok=True, delete_exp_dir=False)
    exp_dir = exp._exp_dir
    sbatch = []
    for job in exp.jobs:  # NeMo-Run writes <exp_dir>/<job id>_sbatch.sh
        path = os.path.join(exp_dir, f"{job.id}_sbatch.sh")
        if not os.path.isfile(path):
            raise RuntimeError(f"NeMo-Run's dry run wrote no sbatch script for job {job.id} at {path}")
        with open(path) as f:
            sbatch.append(f.read())
    scripts = {}
    for path in sorted(glob.glob(os.path.join(exp_dir, "*", "scripts", "*.sh"))):
        with open(path) as f:
            scripts[os.path.basename(path)] = f.read()
    if not keep_files:
        shutil.rmtree(exp_dir, ignore_errors=True)
    return RenderedLaunch(sbatch=sbatch[0], scripts=scripts, chained=sbatch[1:])


def submitted_job_ids(exp: Any) -> list[str]:
    """Slurm job ids of a submitted experiment's jobs, in submission order (the chained ones last)."""
    from torchx.specs.api import parse_app_handle

    return [parse_app_handle(job.handle).app_id for job in exp.jobs if getattr(job, "handle", "")]


def _gpu_slices(plan: LaunchPlan, num_gpus: int) -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES per role on one machine: the learner's GPUs first, then each server's own."""
    if not num_gpus:
        return {}
    learner_gpus = plan.group(LEARNER).gpus_per_node
    slices, next_gpu = {"trainer": range(learner_gpus)}, learner_gpus
    for server in plan.servers:
        if server.group == LEARNER:  # colocated: the same GPUs as the learner
            slices[server.name] = range(server.num_gpus)
        else:
            slices[server.name] = range(next_gpu, next_gpu + server.num_gpus)
            next_gpu += server.num_gpus
    if next_gpu > num_gpus:
        raise ValueError(f"the machine has {num_gpus} GPUs but the learner ({learner_gpus}) and the servers "
                         f"on their own GPUs need {next_gpu}; lower learner_gpus or the servers' tp_size/dp_size")
    return {role: ",".join(map(str, r)) for role, r in slices.items()}


def _single_machine_plan(cfg: RunConfig, config_path: str, overrides: tuple[str, ...], num_gpus: int,
                         learner_gpus: int | None, embed_config: bool,
                         **layout_kwargs: Any) -> tuple[LaunchPlan, dict[str, str]]:
    # The machine is one learner "node" of `learner_gpus` GPUs; servers take GPUs after those.
    learner = num_gpus if learner_gpus is None else learner_gpus
    layout = ClusterLayout(num_nodes=1, gpus_per_node=learner, **layout_kwargs)
    plan = plan_launch(cfg, config_path, layout, host=local_host, user_overrides=overrides,
                       embed_config=embed_config, one_machine=True)
    return plan, _gpu_slices(plan, num_gpus)


def supervisor_spec(plan: LaunchPlan, slices: dict[str, str], *, log_dir: str) -> SupervisorSpec:
    """The one-machine run as launch/supervisor.py runs it: every server (logging to
    `<log_dir>/<name>.log`), then the trainer."""
    def gpus(role: str) -> dict[str, str]:
        return {"CUDA_VISIBLE_DEVICES": slices[role]} if role in slices else {}

    servers = [SupervisedServer(name=s.name, script=server_script(s, plan.activate), url=s.url, env=gpus(s.name))
               for s in plan.servers]
    return SupervisorSpec(servers=servers, trainer_script=plan.trainer_script, trainer_env=gpus("trainer"),
                          log_dir=log_dir)


def _supervisor_script(spec: SupervisorSpec, python: str) -> Any:
    return _script(f"set -euo pipefail\nexec {python} -m megatron_s2lpo.launch.supervisor "
                   f"--spec-json {shlex.quote(spec.to_json())}\n")


def _local_trainer_provides(num_gpus: int) -> tuple[str, ...]:
    """What this machine's interpreter offers the weight-sync transports (plan.check_trainer_environment)."""
    has_sglang = importlib.util.find_spec("sglang") is not None
    return tuple(name for name, present in (("cuda", num_gpus > 0), ("sglang", has_sglang)) if present)


def build_local_experiment(config_path: str, overrides: tuple[str, ...] = (), *, num_gpus: int = 0,
                           learner_gpus: int | None = None, title: str = "", base_dir: str | None = None,
                           **layout_kwargs: Any) -> tuple[Any, LaunchPlan]:
    """One machine with NeMo-Run's LocalExecutor: one task, the supervisor (launch/supervisor.py),
    which starts the servers (if any), runs the trainer and stops the servers when it ends.

    `num_gpus=0` is a CPU run (the tiny config: in-process engines, one trainer process).
    Run it with `with exp: exp.run()`; it returns when the trainer has ended.
    """
    import nemo_run as run

    from ..config import load_config

    config_path = os.path.abspath(config_path)  # the task does not run in this directory
    cfg = load_config(config_path, overrides)
    layout_kwargs.setdefault("python", sys.executable)
    layout_kwargs.setdefault("resume", False)
    layout_kwargs.setdefault("trainer_provides", _local_trainer_provides(num_gpus))
    plan, slices = _single_machine_plan(cfg, config_path, overrides, num_gpus, learner_gpus, embed_config=False,
                                        **layout_kwargs)
    exp = _experiment(title or cfg.run.name, base_dir)
    with exp:
        spec = supervisor_spec(plan, slices, log_dir=os.path.join(cfg.run.output_dir, SERVER_LOGS))
        exp.add(_supervisor_script(spec, layout_kwargs["python"]),
                executor=run.LocalExecutor(ntasks_per_node=1, env_vars=dict(plan.env)), name=SUPERVISOR)
    return exp, plan


def build_docker_experiment(config_path: str, overrides: tuple[str, ...] = (), *, container_image: str,
                            num_gpus: int = 8, learner_gpus: int | None = None, volumes: tuple[str, ...] = (),
                            title: str = "", base_dir: str | None = None,
                            **layout_kwargs: Any) -> tuple[Any, LaunchPlan]:
    """One GPU machine with NeMo-Run's DockerExecutor: one container (host network and IPC) running
    the supervisor, which starts the servers on their GPUs, runs the trainer and stops the servers."""
    import nemo_run as run

    from ..config import load_config

    cfg = load_config(config_path, overrides)
    # The resolved config travels inside the trainer's script: nothing of this checkout is mounted.
    plan, slices = _single_machine_plan(cfg, config_path, overrides, num_gpus, learner_gpus, embed_config=True,
                                        **layout_kwargs)
    exp = _experiment(title or cfg.run.name, base_dir)
    with exp:
        executor = run.DockerExecutor(container_image=container_image, num_gpus=-1, network="host",
                                      ipc_mode="host", shm_size="16g", volumes=list(volumes),
                                      env_vars=dict(plan.env), packager=run.Packager())
        spec = supervisor_spec(plan, slices, log_dir=os.path.join(cfg.run.output_dir, SERVER_LOGS))
        exp.add(_supervisor_script(spec, layout_kwargs.get("python", "python")),
                executor=executor, name=SUPERVISOR)
    return exp, plan
