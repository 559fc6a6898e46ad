"""S2L-PO next to plain GRPO on the synthetic arithmetic task, on a CPU: held-out accuracy vs step.

    .venv/bin/python examples/s2lpo_demo.py [--recipe paper|strong_explorer] [--steps N] [--out DIR] [--seed S]
    .venv/bin/python examples/s2lpo_demo.py --steps 4 --set run.eval_every=2 --set algo.t_mix=3

Runs `s2lpo train RECIPE` twice, one after the other, exactly as a user would: S2L-PO (the
recipe's annealed explorer share) and the GRPO baseline (`algo.t_mix=0`), from the same
warm-started learner. The recipe is `--recipe paper` (default: examples/tiny_cpu_paper.yaml,
an explorer weaker than the learner at pass@1 and stronger at large k, as in the paper) or
`--recipe strong_explorer` (examples/tiny_cpu.yaml, whose explorer is the better model
outright), or any YAML by `--config`. The two warm-started models (`init_sft_steps`) are built
by the first run and cached in `<out>/models` (rebuilt when the recipe's model or task settings
change), so later demos skip them. Before training, `s2lpo eval` scores the warm-started
learner on the held-out prompts (step 0). Then it reads each run's `metrics.jsonl` and prints
one row per evaluation: step, alpha, G_w/G_s, explorer and learner train reward of S2L-PO
(means since the previous row), held-out avg@k Pass@1 of both runs, and the share of step time
spent outside generation, rewards, log-probs, training and sync (`time/other`, S2L-PO). It
writes `<out>/accuracy.png` (held-out accuracy vs step, both runs) and `<out>/table.csv`.
One seed shows one draw; benchmarks/methods_bench.py repeats the comparison over seeds.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from megatron_s2lpo.config import load_config  # noqa: E402
from megatron_s2lpo.trainer.metrics import METRICS_FILE, read_metrics  # noqa: E402

RECIPES = {"paper": os.path.join(REPO_ROOT, "examples", "tiny_cpu_paper.yaml"),
           "strong_explorer": os.path.join(REPO_ROOT, "examples", "tiny_cpu.yaml")}
RUNS = (("s2lpo", []), ("grpo", ["algo.t_mix=0"]))
COLUMNS = ("step", "alpha", "G_w/G_s", "reward_explorer", "reward_learner", "acc_s2lpo", "acc_grpo", "other_share")
KEY_FILE = "warm_start.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", choices=sorted(RECIPES), default="paper",
                   help="paper (examples/tiny_cpu_paper.yaml, default) or strong_explorer (examples/tiny_cpu.yaml)")
    p.add_argument("--config", default="", help="a YAML recipe instead of --recipe")
    p.add_argument("--steps", type=int, default=0, help="steps per run (default: the recipe's run.num_steps)")
    p.add_argument("--out", default="", help="output directory (default runs/s2lpo_demo/<recipe>)")
    p.add_argument("--seed", type=int, default=None, help="run.seed and data.seed (default: the recipe's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra section.field=value override for both runs (repeatable)")
    args = p.parse_args(argv)
    if args.steps < 0:
        p.error(f"--steps must be >= 0, got {args.steps}")
    name = os.path.splitext(os.path.basename(args.config))[0] if args.config else args.recipe
    args.config = args.config or RECIPES[args.recipe]
    if not os.path.isfile(args.config):
        p.error(f"--config {args.config}: no such file")
    args.out = args.out or os.path.join(REPO_ROOT, "runs", "s2lpo_demo", name)
    return args


def base_overrides(args: argparse.Namespace) -> list[str]:
    out = list(args.overrides)
    if args.steps:
        out.append(f"run.num_steps={args.steps}")
    if args.seed is not None:
        out += [f"run.seed={args.seed}", f"data.seed={args.seed}"]
    return out


def warm_start_key(cfg) -> str:
    """What the cached models depend on: both model sections (minus sampling) and the task."""
    parts = {name: {k: v for k, v in dataclasses.asdict(getattr(cfg.rollout, name)).items() if k != "sampling"}
             for name in ("learner", "explorer")}
    parts["synthetic"] = dataclasses.asdict(cfg.data.synthetic)
    return json.dumps(parts, sort_keys=True, default=str)


def prepare_cache(cache: str, key: str) -> None:
    """Drop the cached models when the settings they were built from changed."""
    key_path = os.path.join(cache, KEY_FILE)
    if os.path.isdir(cache):
        old = ""
        if os.path.isfile(key_path):
            with open(key_path) as f:
                old = f.read()
        if old != key:
            shutil.rmtree(cache)
    os.makedirs(cache, exist_ok=True)
    with open(key_path, "w") as f:
        f.write(key)


def run_cli(argv: list[str], log_path: str) -> None:
    """`python -m megatron_s2lpo.cli ARGV`, output to `log_path`; eval progress lines echoed."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "megatron_s2lpo.cli", *argv], cwd=REPO_ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(line)
            if " eval=" in line:
                print("    " + line.strip(), flush=True)
        rc = proc.wait()
    if rc != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"s2lpo {argv[0]} failed (exit {rc}); log {log_path}:\n{tail}")


def train_run(name: str, extra: list[str], args: argparse.Namespace, cache: str) -> list[dict]:
    """One `s2lpo train` run in <out>/<name> with the cached models; returns its metrics records."""
    run_dir = os.path.join(args.out, name)
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(os.path.join(run_dir, "models"))
    for model in os.listdir(cache):
        if os.path.isfile(os.path.join(cache, model, "config.json")):
            shutil.copytree(os.path.join(cache, model), os.path.join(run_dir, "models", model))
    print(f"[{name}] s2lpo train {' '.join(extra) or '(recipe)'} -> {run_dir}", flush=True)
    start = time.perf_counter()
    run_cli(["train", args.config, *base_overrides(args), *extra, f"run.output_dir={run_dir}",
             f"run.name={name}"], os.path.join(args.out, f"{name}.log"))
    print(f"[{name}] done in {time.perf_counter() - start:.0f} s", flush=True)
    for model in os.listdir(os.path.join(run_dir, "models")):  # warm starts built by this run
        if not os.path.isdir(os.path.join(cache, model)):
            shutil.copytree(os.path.join(run_dir, "models", model), os.path.join(cache, model))
    return read_metrics(os.path.join(run_dir, METRICS_FILE))


def initial_accuracy(args: argparse.Namespace, cache: str, k: int) -> float:
    """Held-out avg@k Pass@1 of the warm-started learner (`s2lpo eval`), the table's step 0."""
    out = os.path.join(args.out, "eval_step0")
    run_cli(["eval", args.config, *base_overrides(args), f"run.output_dir={args.out}", "--models",
             os.path.join(cache, "learner"), "--k", str(k), "--out", out], os.path.join(args.out, "eval.log"))
    with open(os.path.join(out, "passk.csv")) as f:
        return float(next(csv.DictReader(f))["avg_at_k_pass1"])


def _mean(values: list[float]) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def plain_steps(records: list[dict], save_every: int, num_steps: int) -> list[dict]:
    """Records of steps without a held-out eval or a checkpoint (the plain training steps)."""
    return [r for r in records if r.get("eval/avg_at_k") is None and r["step"] != num_steps
            and not (save_every and r["step"] % save_every == 0)]


def other_share(records: list[dict]) -> float:
    return _mean([r["time/other"] / r["time/step"] for r in records])


def build_table(s2lpo: list[dict], grpo: list[dict], acc0: float, *, save_every: int = 0,
                num_steps: int = 0) -> list[dict]:
    """One row per evaluated step (plus step 0), S2L-PO's rewards averaged since the previous row
    and its other-time share over the plain steps (no eval, no checkpoint) since then."""
    grpo_acc = {r["step"]: r.get("eval/avg_at_k") for r in grpo}
    rows = [dict(step=0, alpha=float("nan"), G="-", reward_explorer=float("nan"), reward_learner=float("nan"),
                 acc_s2lpo=acc0, acc_grpo=acc0, other_share=float("nan"))]
    window: list[dict] = []
    for r in s2lpo:
        window.append(r)
        if r.get("eval/avg_at_k") is None:
            continue
        rows.append(dict(
            step=r["step"], alpha=r["alpha"], G=f"{int(r['G_w'])}/{int(r['G_s'])}",
            reward_explorer=_mean([w.get("reward/explorer") for w in window]),
            reward_learner=_mean([w.get("reward/learner") for w in window]),
            acc_s2lpo=r["eval/avg_at_k"], acc_grpo=grpo_acc.get(r["step"], float("nan")),
            other_share=other_share(plain_steps(window, save_every, num_steps))))
        window = []
    return rows


def print_table(rows: list[dict]) -> None:
    print(" ".join(f"{c:>15}" for c in COLUMNS))
    for row in rows:
        cells = [f"{row['step']:>15d}", f"{row['alpha']:>15.3f}", f"{row['G']:>15}"]
        cells += [f"{row[c]:>15.3f}" for c in COLUMNS[3:]]
        print(" ".join(cells).replace("nan", "  -"))


def write_outputs(rows: list[dict], out: str) -> str:
    """table.csv and accuracy.png (matplotlib, Agg) under `out`; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(out, "table.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow([row["step"], row["alpha"], row["G"]] + [row[c] for c in COLUMNS[3:]])
    steps = [row["step"] for row in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [row["acc_s2lpo"] for row in rows], marker="o", label="S2L-PO")
    ax.plot(steps, [row["acc_grpo"] for row in rows], marker="s", label="GRPO (t_mix=0)")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out avg@k Pass@1 (learner)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out, "accuracy.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out = os.path.abspath(args.out)
    cfg = load_config(args.config, base_overrides(args))
    if not cfg.run.eval_every or not cfg.data.synthetic.num_eval or cfg.data.train_path:
        raise SystemExit("the demo needs the synthetic task with held-out prompts and evaluation: "
                         "data.train_path empty, data.synthetic.num_eval > 0, run.eval_every > 0")
    start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    cache = os.path.join(args.out, "models")
    prepare_cache(cache, warm_start_key(cfg))
    records = {name: train_run(name, extra, args, cache) for name, extra in RUNS}
    acc0 = initial_accuracy(args, cache, cfg.run.eval_num_samples)
    run = cfg.run
    rows = build_table(records["s2lpo"], records["grpo"], acc0, save_every=run.save_every, num_steps=run.num_steps)
    print()
    print_table(rows)
    png = write_outputs(rows, args.out)
    other = {name: other_share(plain_steps(recs, run.save_every, run.num_steps)) for name, recs in records.items()}
    other_all = {name: other_share(recs) for name, recs in records.items()}
    first, last = rows[1] if len(rows) > 1 else rows[0], rows[-1]
    print(f"\nheld-out accuracy (step {first['step']} -> {last['step']}): "
          f"S2L-PO {first['acc_s2lpo']:.3f} -> {last['acc_s2lpo']:.3f}, "
          f"GRPO {first['acc_grpo']:.3f} -> {last['acc_grpo']:.3f} (step 0: {acc0:.3f}); "
          f"mean other-time share S2L-PO {other['s2lpo']:.1%}, GRPO {other['grpo']:.1%} "
          f"(over all steps: {other_all['s2lpo']:.1%}, {other_all['grpo']:.1%}); "
          f"total {time.perf_counter() - start:.0f} s; plot {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
