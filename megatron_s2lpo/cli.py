"""The `s2lpo` command line.

    s2lpo config examples/tiny_cpu.yaml algo.t_mix=8      # print the resolved config
    s2lpo schedule --group-size 16 --t-mix 8 --steps 12   # the explorer/learner split per step
    s2lpo train examples/tiny_cpu.yaml run.num_steps=20   # S2L-PO training (--resume continues)
    s2lpo train examples/tiny_bridge_cpu.yaml             # a multi-stage run (teacher GRPO -> ... -> student GRPO)
    s2lpo explore CONFIG --num-samples 16                 # fill rollout.explorer_store offline
    s2lpo eval CONFIG --models DIR1 DIR2 --k 16           # avg@k Pass@1 and pass@k curves (CSV, PNG)
    s2lpo convert hf-to-mcore --hf DIR --out CKPT --tp 4  # checkpoint conversion (see docs/convert.md)
    s2lpo plan examples/qwen3_8b_explorer_1p7b.yaml --gpu-memory-gb 80 --learner-gpus 16   # does it fit?

Every command that takes a recipe accepts dotted overrides after it (`section.field=value`).
"""

from __future__ import annotations

import argparse
import sys

from megatron_s2lpo.config import split_recipe


def _cmd_config(args: argparse.Namespace) -> int:
    from megatron_s2lpo.config import load_config

    config, overrides = split_recipe(args.config, args.overrides)
    cfg = load_config(config, overrides)
    sys.stdout.write(cfg.to_yaml())
    return 0


def _cmd_schedule(args: argparse.Namespace) -> int:
    from megatron_s2lpo.algo.schedule import schedule_share, split_group

    steps = args.steps or max(args.t_mix + 2, 4)
    print(f"{'step':>5} {'alpha':>7} {'G_w':>4} {'G_s':>4}")
    for step in range(1, steps + 1):
        alpha = schedule_share(step, args.t_mix, schedule=args.schedule,
                               constant_share=args.constant_share)
        g_explorer, g_learner = split_group(step, args.group_size, args.t_mix, schedule=args.schedule,
                                            constant_share=args.constant_share, rounding=args.rounding)
        print(f"{step:>5} {alpha:>7.4f} {g_explorer:>4} {g_learner:>4}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from megatron_s2lpo.trainer.run import main as train_main

    config, overrides = split_recipe(args.config, args.overrides)
    return train_main(([config] if config else []) + overrides + (["--resume"] if args.resume else []))


def _cmd_explore(args: argparse.Namespace) -> int:
    from megatron_s2lpo.trainer.evaluate import explore

    config, overrides = split_recipe(args.config, args.overrides)
    summary = explore(load_config_or_defaults(config, overrides), num_samples=args.num_samples)
    print(f"explorer store {summary['store_dir']}: {summary['num_prompts']} prompts x "
          f"{summary['num_samples']} samples ({summary['num_generated']} generated now)")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from megatron_s2lpo.trainer.evaluate import evaluate_models

    config, overrides = split_recipe(args.config, args.overrides)
    result = evaluate_models(load_config_or_defaults(config, overrides), args.models, k=args.k,
                             out_dir=args.out or None)
    for model, row in result["avg_at_k"].items():
        print(f"{model}: avg@{args.k} Pass@1 = {row:.4f}")
    print(f"wrote {', '.join(result['files'])}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from megatron_s2lpo.convert.tool import main as convert_main

    return convert_main(args.args)


def _cmd_plan(args: argparse.Namespace) -> int:
    from megatron_s2lpo.config import load_config
    from megatron_s2lpo.planner import check_fits
    from megatron_s2lpo.planner.estimate import CPU, GPU

    config, overrides = split_recipe(args.config, args.overrides)
    report = check_fits(load_config(config, overrides), args.gpu_memory_gb, num_learner_gpus=args.learner_gpus,
                        gpus_per_node=args.gpus_per_node, backend=CPU if args.device == "cpu" else GPU,
                        host_memory_gb=args.host_memory_gb)
    sys.stdout.write(report.text())
    return 0 if report.fits else 1


def load_config_or_defaults(config: str | None, overrides: list[str]):
    from megatron_s2lpo.config import load_config

    return load_config(config, overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="s2lpo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="print the resolved config of a recipe with overrides")
    p.add_argument("config", nargs="?", default=None, help="YAML recipe (defaults when omitted)")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("schedule", help="print the explorer share and group split per step")
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--t-mix", type=int, required=True)
    p.add_argument("--steps", type=int, default=0, help="rows to print (default: t_mix + 2)")
    p.add_argument("--schedule", default="linear")
    p.add_argument("--constant-share", type=float, default=0.5)
    p.add_argument("--rounding", default="paper")
    p.set_defaults(func=_cmd_schedule)

    p = sub.add_parser("train", help="run training: GRPO / S2L-PO / PODS, forward_kl, opd (algo.method), "
                       "or every stage of a recipe with `stages:`")
    p.add_argument("config", nargs="?", default=None, help="YAML recipe")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint, in the "
                   "current stage of a staged run (same as run.resume=true)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("explore", help="fill the explorer rollout store (rollout.explorer_store)")
    p.add_argument("config", nargs="?", default=None, help="YAML recipe")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    p.add_argument("--num-samples", type=int, default=0, help="samples per prompt (default: algo.group_size)")
    p.set_defaults(func=_cmd_explore)

    p = sub.add_parser("eval", help="avg@k Pass@1 and the pass@k curve of HF models on held-out prompts")
    p.add_argument("config", nargs="?", default=None, help="YAML recipe (prompts, tokenizer, sampling)")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    p.add_argument("--models", nargs="+", required=True, help="HF model directories")
    p.add_argument("--k", type=int, default=16, help="samples per problem (pass@k for k = 1..K)")
    p.add_argument("--out", default="", help="output directory (default: <run.output_dir>/eval)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("plan", help="estimate per-GPU memory of the learner and the servers; exit 1 if the "
                       "recipe does not fit (docs/learner.md, 'Memory planner')")
    p.add_argument("config", nargs="?", default=None, help="YAML recipe")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU (default 80, H100)")
    p.add_argument("--learner-gpus", type=int, default=None,
                   help="GPUs of the learner (sets data parallel); default: one node of --gpus-per-node")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--host-memory-gb", type=float, default=None,
                   help="host memory of a learner node; the learner's is always reported, checked against this")
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                   help="gpu: TE spec with fused attention (default); cpu: the local spec as it runs on a CPU")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("convert", help="convert checkpoints HF <-> megatron-core (tools/convert_checkpoint.py)",
                       add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER, help="the conversion tool's arguments")
    p.set_defaults(func=_cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["convert"]:  # every argument (--help included) belongs to the conversion tool
        from megatron_s2lpo.convert.tool import main as convert_main

        return convert_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"s2lpo {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
