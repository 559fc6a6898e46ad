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
reference those variables. nemo_run is imported only inside these functions.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any

from ..config import RunConfig
from .plan import LEARNER, ClusterLayout, LaunchPlan, host_var, local_host, plan_launch, server_script, slurm_host


@dataclass(kw_only=True, slots=True)
class SlurmOptions:
    """Where and how the job runs on the cluster (nothing here changes the training)."""

    account: str
    container_image: str
    partition: str | None = None
    container_mounts: list[str] = field(default_factory=list)  # "host_path:container_path"
    time: str = "04:00:00"
    job_dir: str = ""  # sbatch script and logs, on storage the login node writes ("" = ~/.nemo_run)
    ssh_host: str = ""  # submit over SSH from a workstation; empty: run on a login node
    ssh_user: str = ""
    env: dict[str, str] = field(default_factory=dict)  # extra environment, e.g. NCCL_SOCKET_IFNAME
    max_retries: int = 0  # requeues after a failure (the trainer resumes from its last checkpoint)
    exclusive: bool = True

    def __post_init__(self) -> None:
        if not self.account:
            raise ValueError("Slurm account is empty: pass --account")
        if not self.container_image:
            raise ValueError("container image is empty: pass --container-image (see Dockerfile, docs/cluster.md)")
        for mount in self.container_mounts:
            if ":" not in mount:
                raise ValueError(f"container mount {mount!r} must look like /host/path:/container/path")
        if self.ssh_host and not (self.ssh_user and self.job_dir):
            raise ValueError("submitting over SSH (ssh_host) needs ssh_user and job_dir on the cluster")


@dataclass(kw_only=True, slots=True)
class RenderedLaunch:
    sbatch: str  # the sbatch script NeMo-Run would submit
    scripts: dict[str, str]  # task scripts the sruns execute, by file name (`<title>-<i>.sh`)


def _script(body: str) -> Any:
    import nemo_run as run

    return run.Script(inline=body)


def _tasks(plan: LaunchPlan) -> list[tuple[str, str, Any]]:
    """(role, node group, script body) in launch order; the colocated server precedes the trainer."""
    colocated = [s for s in plan.servers if s.group == LEARNER]
    others = [s for s in plan.servers if s.group != LEARNER]
    tasks = [(s.name, s.group, server_script(s)) for s in colocated]
    tasks.append(("trainer", LEARNER, plan.trainer_script))
    tasks += [(s.name, s.group, server_script(s)) for s in others]
    return tasks


def _host_exports(plan: LaunchPlan, heterogeneous: bool) -> str:
    lines = []
    for index, group in enumerate(plan.groups):
        nodelist = f"$SLURM_JOB_NODELIST_HET_GROUP_{index}" if heterogeneous else "$SLURM_JOB_NODELIST"
        lines.append(f'export {host_var(group.name)}=$(scontrol show hostnames "{nodelist}" | head -n1)')
    return "\n".join(lines)


def build_slurm_experiment(cfg: RunConfig, config_path: str, layout: ClusterLayout, opts: SlurmOptions, *,
                           title: str = "", user_overrides: tuple[str, ...] = (),
                           base_dir: str | None = None) -> tuple[Any, LaunchPlan]:
    """A NeMo-Run experiment holding one Slurm job (heterogeneous when servers have own nodes)."""
    import nemo_run as run

    plan = plan_launch(cfg, config_path, layout, host=slurm_host, user_overrides=user_overrides)
    heterogeneous = len(plan.groups) > 1
    group_index = {g.name: i for i, g in enumerate(plan.groups)}
    if opts.ssh_host:
        tunnel = run.SSHTunnel(host=opts.ssh_host, user=opts.ssh_user, job_dir=opts.job_dir)
    else:
        tunnel = run.LocalTunnel(job_dir=opts.job_dir)
    tasks = _tasks(plan)
    scripts, executors = [], []
    for role, group_name, body in tasks:
        group = plan.groups[group_index[group_name]]
        srun_args = []
        if plan.colocated and group_name == LEARNER:
            srun_args.append("--overlap")  # trainer and server steps share the node's GPUs
            if role != "trainer":  # one server, on the learner's first node (global rank 0)
                srun_args += ["--nodes=1", "--ntasks=1", f"--nodelist={slurm_host(LEARNER)}"]
        executors.append(run.SlurmExecutor(
            account=opts.account, partition=opts.partition, time=opts.time, nodes=group.num_nodes,
            ntasks_per_node=1, gpus_per_node=group.gpus_per_node or None,
            container_image=opts.container_image, container_mounts=list(opts.container_mounts),
            env_vars={**plan.env, **opts.env}, srun_args=srun_args or None, heterogeneous=heterogeneous,
            exclusive=opts.exclusive or None, retries=opts.max_retries, packager=run.Packager(), tunnel=tunnel))
        scripts.append(_script(body))
    main = executors[0]
    main.setup_lines = "\n".join([_host_exports(plan, heterogeneous), *plan.setup_lines])
    if heterogeneous:
        main.het_group_indices = [group_index[g] for _, g, _ in tasks]
    exp = _experiment(title or cfg.run.name, base_dir)
    with exp:
        exp.add(scripts, executor=executors, name=title or cfg.run.name)
    return exp, plan


def _experiment(title: str, base_dir: str | None) -> Any:
    import nemo_run as run

    kwargs = {"base_dir": base_dir} if base_dir else {}
    return run.Experiment(title, log_level="WARN", **kwargs)


def render_slurm(exp: Any, *, keep_files: bool = False) -> RenderedLaunch:
    """NeMo-Run's dry run of a Slurm experiment: the sbatch script and task scripts, not submitted."""
    with exp:
        exp.dryrun(log=False, exist_ok=True, delete_exp_dir=False)
    exp_dir = exp._exp_dir
    sbatch = sorted(glob.glob(os.path.join(exp_dir, "*_sbatch.sh")))
    if not sbatch:
        raise RuntimeError(f"NeMo-Run's dry run wrote no sbatch script under {exp_dir}")
    with open(sbatch[0]) as f:
        text = f.read()
    scripts = {}
    for path in sorted(glob.glob(os.path.join(exp_dir, "*", "scripts", "*.sh"))):
        with open(path) as f:
            scripts[os.path.basename(path)] = f.read()
    if not keep_files:
        shutil.rmtree(exp_dir, ignore_errors=True)
    return RenderedLaunch(sbatch=text, scripts=scripts)


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


def build_local_experiment(config_path: str, overrides: tuple[str, ...] = (), *, num_gpus: int = 0,
                           learner_gpus: int | None = None, title: str = "", base_dir: str | None = None,
                           **layout_kwargs: Any) -> tuple[Any, LaunchPlan]:
    """One machine with NeMo-Run's LocalExecutor: servers (if any) and the trainer as parallel tasks.

    `num_gpus=0` is a CPU run (the tiny config: in-process engines, one trainer process).
    Run it with `with exp: exp.run(sequential=False)`.
    """
    import nemo_run as run

    from ..config import load_config

    config_path = os.path.abspath(config_path)  # the task does not run in this directory
    cfg = load_config(config_path, overrides)
    layout_kwargs.setdefault("python", sys.executable)
    layout_kwargs.setdefault("resume", False)
    plan, slices = _single_machine_plan(cfg, config_path, overrides, num_gpus, learner_gpus, embed_config=False,
                                        **layout_kwargs)
    exp = _experiment(title or cfg.run.name, base_dir)
    with exp:
        for role, _group, body in _tasks(plan):
            env = dict(plan.env)
            if role in slices:
                env["CUDA_VISIBLE_DEVICES"] = slices[role]
            exp.add(_script(body), executor=run.LocalExecutor(ntasks_per_node=1, env_vars=env), name=role)
    return exp, plan


def build_docker_experiment(config_path: str, overrides: tuple[str, ...] = (), *, container_image: str,
                            num_gpus: int = 8, learner_gpus: int | None = None, volumes: tuple[str, ...] = (),
                            title: str = "", base_dir: str | None = None,
                            **layout_kwargs: Any) -> tuple[Any, LaunchPlan]:
    """One GPU machine with NeMo-Run's DockerExecutor: one container per task, host network and IPC
    (127.0.0.1 URLs; CUDA IPC weight sync between the trainer's and a colocated server's containers)."""
    import nemo_run as run

    from ..config import load_config

    cfg = load_config(config_path, overrides)
    # The resolved config travels inside the trainer's script: nothing of this checkout is mounted.
    plan, slices = _single_machine_plan(cfg, config_path, overrides, num_gpus, learner_gpus, embed_config=True,
                                        **layout_kwargs)
    exp = _experiment(title or cfg.run.name, base_dir)
    with exp:
        for role, _group, body in _tasks(plan):
            env = {**plan.env, "CUDA_VISIBLE_DEVICES": slices.get(role, "")}
            executor = run.DockerExecutor(container_image=container_image, num_gpus=-1, network="host",
                                          ipc_mode="host", shm_size="16g", volumes=list(volumes),
                                          env_vars=env, packager=run.Packager())
            exp.add(_script(body), executor=executor, name=role)
    return exp, plan
