"""Launch a recipe with NeMo-Run: a Slurm cluster, this machine, or Docker on this machine.

    # render the sbatch script and the task scripts, submit nothing
    python examples/launch.py --recipe qwen3_8b_explorer_1p7b --executor slurm --nodes 4 \\
        --account A --partition P --container-image IMAGE \\
        --mounts /lustre/models:/models,/lustre/data:/data,/lustre/ckpt:/checkpoints --dryrun
    # submit (from a login node; --ssh-host/--ssh-user/--job-dir to submit from a workstation)
    python examples/launch.py --recipe qwen3_8b_explorer_1p7b --executor slurm --nodes 4 \\
        --account A --partition P --container-image IMAGE --mounts ... --job-dir /lustre/jobs
    # one machine: the tiny CPU recipe, or a GPU recipe with its servers on spare GPUs
    python examples/launch.py --recipe tiny_cpu --executor local run.num_steps=3
    python examples/launch.py --recipe qwen3_8b_explorer_1p7b --executor docker --gpus 8 \\
        --learner-gpus 4 --container-image IMAGE --mounts /models:/models,... learner.tensor_parallel_size=2

Before anything is written or submitted the recipe is sized for the GPUs (megatron_s2lpo/planner,
`s2lpo plan`); one that would not fit is refused with what to change (`--allow-over-budget`
launches it anyway). `--recipe` is a name under examples/ (`qwen3_8b_explorer_1p7b`, `qwen3_8b_explorer_4b`,
`qwen3_14b_explorer_4b`, `tiny_cpu`) or a YAML path; trailing `section.field=value` arguments
override it. The layout (which nodes run the learner, its SGLang server, the explorer's) is
derived from the recipe: see megatron_s2lpo/launch/plan.py and docs/cluster.md.
"""

from __future__ import annotations

import argparse
import os
import sys

EXAMPLES = os.path.dirname(os.path.abspath(__file__))
# Node counts the recipes were sized for (stated in each YAML's header; docs/cluster.md).
RECIPE_NODES = {"qwen3_8b_explorer_1p7b": 4, "qwen3_8b_explorer_4b": 4, "qwen3_14b_explorer_4b": 6}


def recipe_path(recipe: str) -> str:
    path = recipe if recipe.endswith((".yaml", ".yml")) else os.path.join(EXAMPLES, f"{recipe}.yaml")
    if not os.path.isfile(path):
        names = sorted(f[:-5] for f in os.listdir(EXAMPLES) if f.endswith(".yaml"))
        raise FileNotFoundError(f"recipe {recipe!r} not found at {path}; choose one of {names} or pass a YAML path")
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--recipe", required=True)
    p.add_argument("--executor", choices=("slurm", "local", "docker"), default="slurm")
    p.add_argument("--dryrun", action="store_true", help="print what would run; submit nothing")
    p.add_argument("--title", default="", help="experiment name (default: run.name)")
    p.add_argument("--container-image", default="")
    p.add_argument("--mounts", default="", help="comma-separated host:container paths")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment")
    p.add_argument("--colocate", action=argparse.BooleanOptionalAction, default=None,
                   help="learner server on the learner's GPUs (default: when sync.transport=tensor)")
    p.add_argument("--no-resume", action="store_true", help="do not pass run.resume=true")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="GPU memory the recipe is checked against "
                   "before launching (s2lpo plan)")
    p.add_argument("--allow-over-budget", action="store_true", help="launch even if the memory check refuses it")
    slurm = p.add_argument_group("slurm")
    slurm.add_argument("--nodes", type=int, default=0, help="total nodes (default: the recipe's)")
    slurm.add_argument("--gpus-per-node", type=int, default=8)
    slurm.add_argument("--account", default="")
    slurm.add_argument("--partition", default=None)
    slurm.add_argument("--time", default="04:00:00")
    slurm.add_argument("--job-dir", default="", help="shared directory for the sbatch script and logs")
    slurm.add_argument("--ssh-host", default="")
    slurm.add_argument("--ssh-user", default="")
    slurm.add_argument("--retries", type=int, default=0, help="requeues after a failure (resumes)")
    one = p.add_argument_group("local / docker")
    one.add_argument("--gpus", type=int, default=0, help="GPUs of this machine (0: CPU)")
    one.add_argument("--learner-gpus", type=int, default=None, help="GPUs for the learner (default: all)")
    args, overrides = p.parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("-") or "=" not in o]
    if unknown:
        p.error(f"unrecognized arguments {unknown}; overrides look like section.field=value")
    args.overrides = tuple(overrides)
    return args


def _env(pairs: list[str]) -> dict[str, str]:
    bad = [e for e in pairs if "=" not in e]
    if bad:
        raise ValueError(f"--env {bad[0]!r} must look like KEY=VALUE")
    return dict(e.split("=", 1) for e in pairs)


def build(args: argparse.Namespace):
    """(experiment, plan) for the parsed command line."""
    from megatron_s2lpo.config import load_config
    from megatron_s2lpo.launch.experiment import (SlurmOptions, build_docker_experiment,
                                                  build_local_experiment, build_slurm_experiment)
    from megatron_s2lpo.launch.plan import ClusterLayout

    path = recipe_path(args.recipe)
    mounts = [m for m in args.mounts.split(",") if m]
    common = dict(colocate_learner_server=args.colocate, resume=not args.no_resume, gpu_memory_gb=args.gpu_memory_gb,
                  allow_over_budget=args.allow_over_budget)
    if args.executor == "slurm":
        name = os.path.splitext(os.path.basename(path))[0]
        nodes = args.nodes or RECIPE_NODES.get(name, 0)
        if not nodes:
            raise ValueError(f"--nodes is required for recipe {name!r} (no default node count)")
        opts = SlurmOptions(account=args.account, partition=args.partition, container_image=args.container_image,
                            container_mounts=mounts, time=args.time, job_dir=args.job_dir, ssh_host=args.ssh_host,
                            ssh_user=args.ssh_user, env=_env(args.env), max_retries=args.retries)
        layout = ClusterLayout(num_nodes=nodes, gpus_per_node=args.gpus_per_node, **common)
        return build_slurm_experiment(load_config(path, args.overrides), path, layout, opts, title=args.title,
                                      user_overrides=args.overrides)
    if args.executor == "local":
        return build_local_experiment(path, args.overrides, num_gpus=args.gpus, learner_gpus=args.learner_gpus,
                                      title=args.title, **common)
    if not args.container_image:
        raise ValueError("--executor docker needs --container-image")
    return build_docker_experiment(path, args.overrides, container_image=args.container_image,
                                   num_gpus=args.gpus or 8, learner_gpus=args.learner_gpus, volumes=tuple(mounts),
                                   title=args.title, **common)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exp, plan = build(args)
    if args.dryrun:
        if args.executor == "slurm":
            from megatron_s2lpo.launch.experiment import render_slurm

            rendered = render_slurm(exp)
            print(rendered.sbatch)
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
            exp.run(sequential=False, tail_logs=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
