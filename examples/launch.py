"""Launch a recipe with NeMo-Run: a Slurm cluster, this machine, or Docker on this machine.

    # render the sbatch script and the task scripts, submit nothing
    python examples/launch.py --recipe qwen3_8b_explorer_1p7b --executor slurm --nodes 4 \\
        --account A --partition P --container-image IMAGE \\
        --mounts /lustre/models:/models,/lustre/data:/data,/lustre/ckpt:/checkpoints --dryrun
    # submit (from a login node; --ssh-host/--ssh-user/--job-dir to submit from a workstation):
    # 12 h jobs, each signalled 34 min before its end to checkpoint, and up to 5 follow-up jobs
    python examples/launch.py --recipe qwen3_8b_explorer_1p7b --executor slurm --nodes 4 \\
        --account A --partition P --container-image IMAGE --mounts ... --job-dir /lustre/jobs \\
        --time 12:00:00 --max-chained-jobs 5 --qos high --sbatch-arg mail-type=END
    # one machine: the tiny CPU recipe, or a GPU recipe with its servers on spare GPUs
    python examples/launch.py --recipe tiny_cpu --executor local run.num_steps=3
    python examples/launch.py --recipe qwen3_8b_explorer_1p7b --executor docker --gpus 8 \\
        --learner-gpus 4 --container-image IMAGE --mounts /models:/models,... learner.tensor_parallel_size=2

Before anything is written or submitted the recipe is sized for the GPUs (megatron_s2lpo/planner,
`s2lpo plan`); one that would not fit is refused with what to change (`--allow-over-budget`
launches it anyway). `--recipe` is a name under examples/ (`qwen3_8b_explorer_1p7b`, `qwen3_8b_explorer_4b`,
`qwen3_14b_explorer_4b`, `qwen3_8b_explorer_1p7b_dapo`, `tiny_cpu`) or a YAML path; trailing `section.field=value` arguments
override it. The layout (which nodes run the learner, its SGLang server, the explorer's) is
derived from the recipe: see megatron_s2lpo/launch/plan.py and docs/cluster.md. Missing Slurm
settings, a recipe that does not fit the nodes, a run.save_every that does not fit in the job's
time limit and a weight sync the image cannot run are usage errors that say what to change.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import warnings

EXAMPLES = os.path.dirname(os.path.abspath(__file__))
# Node counts the recipes were sized for (stated in each YAML's header; docs/cluster.md).
RECIPE_NODES = {"qwen3_8b_explorer_1p7b": 4, "qwen3_8b_explorer_4b": 4, "qwen3_14b_explorer_4b": 6,
                "qwen3_30b_a3b_explorer_4b": 6, "qwen3_8b_explorer_1p7b_dapo": 4}
# Stated minutes per step, the slowest phase (after T_mix: the learner server generates every
# sample); docs/cluster.md "Expected step time". A measured one from an earlier job wins.
RECIPE_STEP_MINUTES = {"qwen3_8b_explorer_1p7b": 23, "qwen3_8b_explorer_4b": 23, "qwen3_14b_explorer_4b": 35,
                       "qwen3_8b_explorer_1p7b_dapo": 55}  # one dynamic-sampling round of 3 x the rollouts


def recipe_path(recipe: str) -> str:
    path = recipe if recipe.endswith((".yaml", ".yml")) else os.path.join(EXAMPLES, f"{recipe}.yaml")
    if not os.path.isfile(path):
        names = sorted(f[:-5] for f in os.listdir(EXAMPLES) if f.endswith(".yaml"))
        raise FileNotFoundError(f"recipe {recipe!r} not found at {path}; choose one of {names} or pass a YAML path")
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--recipe", required=True)
    p.add_argument("--executor", choices=("slurm", "local", "docker"), default="slurm")
    p.add_argument("--dryrun", action="store_true", help="print what would run; submit nothing")
    p.add_argument("--check", action="store_true", help="Slurm: check what the launch needs from this site "
                   "(launch/doctor.py), one line per finding with its fix; submit nothing")
    p.add_argument("--title", default="", help="experiment name (default: run.name)")
    p.add_argument("--container-image", default="", help="the image every task runs in (Slurm: needs pyxis; "
                   "without it the job runs in the environment --venv or --python names)")
    p.add_argument("--mounts", default="", help="comma-separated host:container paths (with --container-image)")
    p.add_argument("--venv", default="", metavar="DIR", help="without a container: the virtual environment every "
                   "task activates (on storage every node reads)")
    p.add_argument("--python", default="", metavar="PATH", help="without a container: the trainer's interpreter "
                   "(another kind of environment, e.g. conda's bin/python); default: --venv's")
    p.add_argument("--sglang-python", default="", metavar="PATH", help="the SGLang servers' interpreter (default: "
                   "$S2LPO_SGLANG_PYTHON on the node, else the trainer's)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment")
    p.add_argument("--colocate", action=argparse.BooleanOptionalAction, default=None,
                   help="learner server on the learner's GPUs (default: when sync.transport=tensor)")
    p.add_argument("--no-resume", action="store_true", help="do not pass run.resume=true")
    p.add_argument("--trainer-provides", default=None, metavar="cuda,sglang",
                   help="what the trainer's environment has for the weight sync (default: the image's, cuda; "
                        "local: this machine's)")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="GPU memory the recipe is checked against "
                   "before launching (s2lpo plan)")
    p.add_argument("--allow-over-budget", action="store_true", help="launch even if the memory check refuses it")
    slurm = p.add_argument_group("slurm")
    slurm.add_argument("--nodes", type=int, default=0, help="total nodes (default: the recipe's)")
    slurm.add_argument("--gpus-per-node", type=int, default=8)
    slurm.add_argument("--account", default="")
    slurm.add_argument("--partition", default="")
    slurm.add_argument("--time", default="", help="time limit, HH:MM:SS or D-HH:MM:SS (default: the partition's "
                       "maximum, from sinfo)")
    slurm.add_argument("--signal-lead", type=int, default=None, metavar="SECONDS",
                       help="SIGUSR1 this long before the limit: the trainer checkpoints and stops "
                            "(default: one step plus 10 min; 0: none)")
    slurm.add_argument("--max-chained-jobs", type=int, default=0, metavar="N",
                       help="submit N follow-up jobs, each starting after the previous ended and resuming")
    slurm.add_argument("--startup-time", type=int, default=None, metavar="SECONDS",
                       help="time a job needs before its first step, for the walltime check (default: 600, a "
                            "quarter of a job shorter than 40 min)")
    slurm.add_argument("--step-time", type=float, default=None, metavar="MINUTES",
                       help="minutes per step for the walltime check (default: measured by an earlier job, "
                            "else the recipe's stated one)")
    slurm.add_argument("--torchrun-port", type=int, default=29500, help="the learner's torchrun rendezvous port "
                       "on its first node")
    slurm.add_argument("--server-ports", default="30000,30001,30002", metavar="LEARNER,EXPLORER,TEACHER",
                       help="the SGLang servers' ports on their nodes (replica i: + 100 i)")
    slurm.add_argument("--job-dir", default="", help="shared directory for the sbatch script and logs")
    slurm.add_argument("--ssh-host", default="")
    slurm.add_argument("--ssh-user", default="")
    slurm.add_argument("--retries", type=int, default=0, help="requeues after a failure that another try may "
                       "not meet (resumes); a usage or configuration error (exit 2) is not requeued")
    slurm.add_argument("--qos", default="")
    slurm.add_argument("--constraint", default="", help="node features, e.g. h100")
    slurm.add_argument("--gres", default="", help="generic resources, e.g. gpu:8")
    slurm.add_argument("--reservation", default="")
    slurm.add_argument("--mem", default="0", help="memory per node (default 0: all of it)")
    slurm.add_argument("--sbatch-arg", action="append", default=[], metavar="KEY[=VALUE]",
                       help="any other sbatch option, e.g. --sbatch-arg mail-type=END (repeatable)")
    slurm.add_argument("--mount-home", action="store_true",
                       help="let pyxis mount $HOME (off: a user's ~/.local would shadow the image's packages)")
    one = p.add_argument_group("local / docker")
    one.add_argument("--gpus", type=int, default=0, help="GPUs of this machine (0: CPU)")
    one.add_argument("--learner-gpus", type=int, default=None, help="GPUs for the learner (default: all)")
    return p


def parse_args(argv: list[str] | None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    p = parser or build_parser()
    args, overrides = p.parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("-") or "=" not in o]
    if unknown:
        p.error(f"unrecognized arguments {unknown}; overrides look like section.field=value")
    if args.executor == "slurm":
        missing = [flag for flag, value in (("--account", args.account), ("--partition", args.partition))
                   if not value]
        if missing:
            p.error(f"--executor slurm needs {', '.join(missing)} (the Slurm account and partition to charge and "
                    "run on)")
        if not args.container_image and not (args.venv or args.python):
            p.error("--executor slurm needs --container-image (the image built from the Dockerfile; the site needs "
                    "pyxis) or, without a container, the environment the job runs in: --venv DIR or --python PATH")
        if args.container_image and (args.venv or args.python):
            p.error("--venv / --python name the environment of a job without a container; with --container-image "
                    "the image's own Python runs")
    if args.check and args.executor != "slurm":
        p.error("--check looks at a Slurm site: use it with --executor slurm")
    if args.executor == "docker" and not args.container_image:
        p.error("--executor docker needs --container-image (the image built from the Dockerfile)")
    args.overrides = tuple(overrides)
    return args


def _env(pairs: list[str]) -> dict[str, str]:
    bad = [e for e in pairs if "=" not in e]
    if bad:
        raise ValueError(f"--env {bad[0]!r} must look like KEY=VALUE")
    return dict(e.split("=", 1) for e in pairs)


def _run_on_cluster(args: argparse.Namespace):
    """`command -> stdout` where Slurm is: this machine, or the login node over SSH."""
    if args.ssh_host:
        import nemo_run as run

        tunnel = run.SSHTunnel(host=args.ssh_host, user=args.ssh_user, job_dir=args.job_dir)
        return lambda command: tunnel.run(command, hide=True).stdout
    return lambda command: subprocess.run(command, shell=True, capture_output=True, text=True, check=True,
                                          timeout=60).stdout


def _slurm_options(args: argparse.Namespace, name: str, mounts: list[str]):
    from megatron_s2lpo.launch.experiment import SlurmOptions
    from megatron_s2lpo.launch.walltime import partition_time_limit

    if args.ssh_host and not (args.ssh_user and args.job_dir):
        raise ValueError("submitting over SSH (--ssh-host) needs --ssh-user and --job-dir on the cluster")
    time = args.time or partition_time_limit(args.partition, _run_on_cluster(args))
    step_minutes = args.step_time if args.step_time is not None else RECIPE_STEP_MINUTES.get(name, 0)
    return SlurmOptions(account=args.account, partition=args.partition, container_image=args.container_image,
                        container_mounts=mounts, time=time, job_dir=args.job_dir, ssh_host=args.ssh_host,
                        startup_s=args.startup_time,
                        ssh_user=args.ssh_user, env=_env(args.env), max_retries=args.retries, mem=args.mem,
                        qos=args.qos, constraint=args.constraint, gres=args.gres, reservation=args.reservation,
                        sbatch_args=list(args.sbatch_arg), mount_home=args.mount_home,
                        signal_lead_s=args.signal_lead, max_chained_jobs=args.max_chained_jobs,
                        step_time_s=60.0 * step_minutes)


def job_environment(venv: str, python: str) -> dict[str, str]:
    """ClusterLayout's python and activate for a job without a container (absolute paths: the
    job does not run in this directory). Raises ValueError for a path that is not there."""
    if not (venv or python):
        return {}
    out = {}
    if venv:
        venv = os.path.abspath(venv)
        activate = os.path.join(venv, "bin", "activate")
        if not os.path.isfile(activate):
            raise FileNotFoundError(f"--venv {venv}: no bin/activate there; name a virtual environment "
                                    "(python -m venv DIR; pip install -e .)")
        out["activate"] = f"source {shlex.quote(activate)}"
        python = python or os.path.join(venv, "bin", "python")
    python = os.path.abspath(python)
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise FileNotFoundError(f"--python {python}: not an executable file; name the interpreter of the "
                                "environment the job runs in")
    if not venv:  # another kind of environment: its bin directory first on PATH, as activating does
        out["activate"] = f'export PATH={shlex.quote(os.path.dirname(python))}:"$PATH"'
    out["python"] = python
    return out


def _layout_kwargs(args: argparse.Namespace) -> dict:
    common = dict(colocate_learner_server=args.colocate, resume=not args.no_resume, gpu_memory_gb=args.gpu_memory_gb,
                  allow_over_budget=args.allow_over_budget)
    if args.trainer_provides is not None:
        common["trainer_provides"] = tuple(x for x in args.trainer_provides.split(",") if x)
    if args.sglang_python:
        common["server_python"] = args.sglang_python
    return common


def _slurm_layout(args: argparse.Namespace, name: str):
    from megatron_s2lpo.launch.plan import ClusterLayout

    nodes = args.nodes or RECIPE_NODES.get(name, 0)
    if not nodes:
        raise ValueError(f"--nodes is required for recipe {name!r} (no default node count)")
    try:
        learner_port, explorer_port, teacher_port = (int(p) for p in args.server_ports.split(","))
    except ValueError as err:
        raise ValueError(f"--server-ports {args.server_ports!r} must be three ports: LEARNER,EXPLORER,TEACHER") from err
    return ClusterLayout(num_nodes=nodes, gpus_per_node=args.gpus_per_node, torchrun_port=args.torchrun_port,
                         learner_port=learner_port, explorer_port=explorer_port, teacher_port=teacher_port,
                         **_layout_kwargs(args), **job_environment(args.venv, args.python))


def check(args: argparse.Namespace) -> int:
    """`--check`: what the launch needs from this site, one line per finding (launch/doctor.py)."""
    from megatron_s2lpo.config import load_config
    from megatron_s2lpo.launch.doctor import check_site
    from megatron_s2lpo.launch.plan import plan_launch, slurm_host

    path = recipe_path(args.recipe)
    name = os.path.splitext(os.path.basename(path))[0]
    cfg = load_config(path, args.overrides)
    layout = _slurm_layout(args, name)
    plan = plan_launch(cfg, path, layout, host=slurm_host, user_overrides=args.overrides)
    if args.ssh_host:
        import nemo_run as run

        tunnel = run.SSHTunnel(host=args.ssh_host, user=args.ssh_user, job_dir=args.job_dir)

        def runner(command):
            result = tunnel.run(command, hide=True, warn=True)
            return result.return_code, result.stdout + result.stderr
    else:
        def runner(command):
            try:
                proc = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=600)
            except subprocess.TimeoutExpired:
                return 124, f"no answer within 600 s: {command[:80]}"
            return proc.returncode, proc.stdout + proc.stderr
    step_minutes = args.step_time if args.step_time is not None else RECIPE_STEP_MINUTES.get(name, 0)
    findings = check_site(cfg, plan, partition=args.partition, time=args.time, container_image=args.container_image,
                          mounts=[m for m in args.mounts.split(",") if m], python=layout.python,
                          server_python=layout.server_python, signal_lead_s=args.signal_lead,
                          step_time_s=60.0 * step_minutes, startup_s=args.startup_time, run=runner)
    for finding in findings:
        print(finding.line())
    failed = sum(f.status == "FAIL" for f in findings)
    print(f"launch --check: {failed} problem(s)" if failed else "launch --check: nothing in the way")
    return 1 if failed else 0


def build(args: argparse.Namespace):
    """(experiment, plan) for the parsed command line."""
    from megatron_s2lpo.config import load_config
    from megatron_s2lpo.launch.experiment import (build_docker_experiment, build_local_experiment,
                                                  build_slurm_experiment)

    path = recipe_path(args.recipe)
    mounts = [m for m in args.mounts.split(",") if m]
    common = _layout_kwargs(args)
    if args.executor == "slurm":
        name = os.path.splitext(os.path.basename(path))[0]
        opts = _slurm_options(args, name, mounts)
        layout = _slurm_layout(args, name)
        return build_slurm_experiment(load_config(path, args.overrides), path, layout, opts, title=args.title,
                                      user_overrides=args.overrides)
    if args.executor == "local":
        return build_local_experiment(path, args.overrides, num_gpus=args.gpus, learner_gpus=args.learner_gpus,
                                      title=args.title, **common)
    return build_docker_experiment(path, args.overrides, container_image=args.container_image,
                                   num_gpus=args.gpus or 8, learner_gpus=args.learner_gpus, volumes=tuple(mounts),
                                   title=args.title, **common)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(argv, parser)
    from megatron_s2lpo.launch.walltime import LaunchWarning

    if args.check:
        try:
            return check(args)
        except (ValueError, FileNotFoundError) as err:
            parser.error(str(err))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("ignore")  # third-party deprecation noise of the NeMo-Run import
        warnings.simplefilter("always", LaunchWarning)
        try:
            exp, plan = build(args)
        except (ValueError, FileNotFoundError) as err:  # a user mistake: usage error, no traceback
            parser.error(str(err))
    for warning in caught:
        print(f"launch: warning: {warning.message}", file=sys.stderr)
    if args.dryrun:
        if args.executor == "slurm":
            from megatron_s2lpo.launch.experiment import render_slurm

            rendered = render_slurm(exp)
            print(rendered.sbatch)
            for i, chained in enumerate(rendered.chained, 1):
                print(f"\n# ---- chained job {i} (submitted with --dependency=afterany:<previous job id>)\n{chained}")
            for name, text in rendered.scripts.items():
                print(f"\n# ---- {name}\n{text}")
        else:
            with exp:
                exp.dryrun()
        return 0
    with exp:
        if args.executor == "slurm":
            exp.run(detach=True)
        else:
            exp.run(tail_logs=True)  # one task, the supervisor: returns when the trainer ends
    if args.executor == "slurm":
        from megatron_s2lpo.launch.experiment import submitted_job_ids

        ids = submitted_job_ids(exp)
        print(f"launch: submitted job(s) {' '.join(ids)} (each chained job starts after the previous one ends); "
              f"watch them with: squeue --jobs {','.join(ids)}")
        print(f"launch: logs: {exp._exp_dir}" if not args.job_dir else f"launch: logs under {args.job_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
