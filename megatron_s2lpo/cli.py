"""The `s2lpo` command line.

    s2lpo config examples/tiny_cpu.yaml algo.t_mix=8      # print the resolved config
    s2lpo schedule --group-size 16 --t-mix 8 --steps 12   # the explorer/learner split per step

Every command that takes a recipe accepts dotted overrides after it (`section.field=value`).
"""

from __future__ import annotations

import argparse
import sys


def _split_recipe(config: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """The recipe is optional: `s2lpo config algo.t_mix=8` means defaults plus an override."""
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        return None, [config, *overrides]
    return config, overrides


def _cmd_config(args: argparse.Namespace) -> int:
    from megatron_s2lpo.config import load_config

    config, overrides = _split_recipe(args.config, args.overrides)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"s2lpo {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
