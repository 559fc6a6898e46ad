"""DAPO's dynamic sampling on the tiny recipe: how many groups it filters in S2L-PO and in GRPO, and
what it does to the held-out curve (docs/training.md, "DAPO: dynamic sampling and overlong reward
shaping").

    python examples/dynamic_sampling_study.py                         # 3 seeds x 4 runs of 200 steps
    python examples/dynamic_sampling_study.py --seeds 1234 --steps 60 --out runs/ds_study
    python examples/dynamic_sampling_study.py --report --out runs/ds_study   # tables of finished runs only

For each seed (`run.seed` = `data.seed`) it runs `s2lpo train examples/tiny_cpu.yaml` four times,
one after the other: S2L-PO (the recipe) and GRPO (`algo.t_mix=0`), each without and with
`algo.dynamic_sampling.enabled=true` (metric `accuracy`, up to 10 rounds), in
`<out>/<s2lpo|grpo>_<off|on>_<seed>`. The warm-started models are built by the first run and
copied into the others (they do not depend on the seed). A run whose metrics.jsonl is complete is
not run again. Then it prints, from the metrics files:

- filtering (runs with dynamic sampling): per window of steps, the share of generated groups
  filtered as uniform, all solved / all failed, the rounds per step, steps that hit the round cap,
  and groups kept only thanks to the explorer's samples;
- the held-out curve (avg@16 Pass@1 on the 46 held-out problems) of all four runs, mean over seeds;
- the cost: prompt + response tokens generated over the run, with dynamic sampling against without.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron_s2lpo.trainer.metrics import read_metrics  # noqa: E402

RECIPE = os.path.join(REPO, "examples", "tiny_cpu.yaml")
VARIANTS = {("s2lpo", "off"): [], ("s2lpo", "on"): ["algo.dynamic_sampling.enabled=true"],
            ("grpo", "off"): ["algo.t_mix=0"], ("grpo", "on"): ["algo.t_mix=0", "algo.dynamic_sampling.enabled=true"]}
WINDOWS = ((1, 20), (21, 100), (101, 200))


def run_dir(out: str, method: str, ds: str, seed: int) -> str:
    return os.path.join(out, f"{method}_{ds}_{seed}")


def complete(path: str, steps: int) -> bool:
    metrics = os.path.join(path, "metrics.jsonl")
    return os.path.isfile(metrics) and any(r["step"] == steps for r in read_metrics(metrics))


def run_all(out: str, seeds: list[int], steps: int) -> None:
    models = os.path.join(out, "models")
    for seed in seeds:
        for (method, ds), overrides in VARIANTS.items():
            path = run_dir(out, method, ds, seed)
            if complete(path, steps):
                continue
            if os.path.isdir(path):
                sys.exit(f"{path} holds an unfinished run; remove it (or continue it with s2lpo train --resume) first")
            os.makedirs(path)
            if os.path.isdir(models):
                shutil.copytree(models, os.path.join(path, "models"))
            cmd = [sys.executable, "-m", "megatron_s2lpo.cli", "train", RECIPE, f"run.output_dir={path}",
                   f"run.seed={seed}", f"data.seed={seed}", f"run.num_steps={steps}", "run.eval_at_start=true",
                   *overrides]
            print(" ".join(cmd[1:]), flush=True)
            with open(os.path.join(path, "train.log"), "w") as log:
                done = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
            if done.returncode:
                sys.exit(f"the run in {path} failed (exit status {done.returncode}); see {path}/train.log")
            if not os.path.isdir(models):
                shutil.copytree(os.path.join(path, "models"), models)


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def filtering_table(out: str, seeds: list[int], steps: int) -> None:
    print("\nFiltering with dynamic sampling: groups filtered per step, then as shares of the groups generated "
          "(all, every sample solved, none solved); rounds per step, steps that hit the round cap, groups kept "
          "only thanks to the explorer per step (means over seeds)")
    print(f"{'run':6} {'steps':>9} {'per step':>8} {'filtered':>9} {'solved':>7} {'failed':>7} {'rounds':>7} "
          f"{'capped':>7} {'via expl':>8}")
    for method in ("s2lpo", "grpo"):
        runs = [read_metrics(os.path.join(run_dir(out, method, "on", s), "metrics.jsonl")) for s in seeds]
        for first, last in WINDOWS:
            if first > steps:
                continue
            rows = [r for records in runs for r in records if first <= r["step"] <= min(last, steps)]
            generated = sum(r["dynamic/groups_generated"] for r in rows)
            share = {key: sum(r[f"dynamic/{key}"] for r in rows) / generated
                     for key in ("groups_filtered", "filtered_solved", "filtered_unsolved")}
            per_step = mean([r["dynamic/groups_filtered"] for r in rows])
            print(f"{method:6} {first:>4}-{min(last, steps):<4} {per_step:>8.1f} {share['groups_filtered']:>9.3f} "
                  f"{share['filtered_solved']:>7.3f} {share['filtered_unsolved']:>7.3f} "
                  f"{mean([r['dynamic/rounds'] for r in rows]):>7.2f} {sum(r['dynamic/cap_hit'] for r in rows):>7.0f} "
                  f"{mean([r['dynamic/informative_via_explorer'] for r in rows]):>8.2f}")


def curve_table(out: str, seeds: list[int]) -> None:
    print("\nHeld-out avg@16 Pass@1, mean over seeds (per seed in brackets at the last step)")
    curves = {}
    for (method, ds) in VARIANTS:
        per_seed = [{r["step"]: r["eval/avg_at_k"] for r in read_metrics(os.path.join(run_dir(out, method, ds, s),
                                                                                    "metrics.jsonl"))
                     if r.get("eval/avg_at_k") is not None} for s in seeds]
        curves[(method, ds)] = per_seed
    eval_steps = sorted(set.intersection(*(set(c) for per_seed in curves.values() for c in per_seed)))
    print(f"{'run':10} " + " ".join(f"{s:>6}" for s in eval_steps) + "   peak  last per seed")
    for (method, ds), per_seed in curves.items():
        means = [mean([c[s] for c in per_seed]) for s in eval_steps]
        peak = mean([max(c.values()) for c in per_seed])
        last = " ".join(f"{c[eval_steps[-1]]:.3f}" for c in per_seed)
        print(f"{method + ' ' + ds:10} " + " ".join(f"{v:6.3f}" for v in means) + f" {peak:6.3f}  [{last}]")


def cost_table(out: str, seeds: list[int]) -> None:
    print("\nTokens generated over the run (prompt + response, both sources), with / without dynamic sampling")
    for method in ("s2lpo", "grpo"):
        ratios = []
        for seed in seeds:
            total = {}
            for ds in ("off", "on"):
                last = read_metrics(os.path.join(run_dir(out, method, ds, seed), "metrics.jsonl"))[-1]
                total[ds] = last["cumulative/rollout_tokens/explorer"] + last["cumulative/rollout_tokens/learner"]
            ratios.append(total["on"] / total["off"])
        print(f"{method:6} " + " ".join(f"{seed}: {ratio:.2f}x" for seed, ratio in zip(seeds, ratios)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 7, 99])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default=os.path.join(REPO, "runs", "dynamic_sampling_study"))
    parser.add_argument("--report", action="store_true", help="only print the tables of finished runs")
    args = parser.parse_args()
    if not args.report:
        run_all(args.out, args.seeds, args.steps)
    filtering_table(args.out, args.seeds, args.steps)
    curve_table(args.out, args.seeds)
    cost_table(args.out, args.seeds)


if __name__ == "__main__":
    main()
