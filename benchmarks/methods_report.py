"""Summary, printed tables and plots of `benchmarks/methods_bench.py` (statistics: methods_stats.py).

`runs` is {method: {seed: {"steps", "acc", "flops", "tokens"}}} (one entry per evaluation,
step 0 first; flops / tokens are the cumulative rollout counters, explorer + learner, at that
step); `curves` is {seed: {split: {"learner" | "explorer": [pass@1 .. pass@K]}}}.
"""

from __future__ import annotations

import csv
import json
import math
import os

from methods_stats import (Interval, area_under_curve, crossover_k, first_reaching, mean_interval,
                           paired_difference)

PASSK_SHOWN = (1, 2, 4, 8, 16, 32, 64)


def _iv(interval: Interval) -> dict:
    return {"mean": interval.mean, "low": interval.low, "high": interval.high, "n": interval.n}


def complete_seeds(runs: dict, methods: list[str]) -> list:
    """Seeds every method finished (paired statistics need all of them)."""
    seeds = set.intersection(*(set(runs.get(m, {})) for m in methods)) if methods else set()
    return sorted(seeds)


def summarize(runs: dict, curves: dict, *, methods: list[str], report_steps: list[int],
              target_gain: float | None, pairs: list[tuple[str, str]] | None = None) -> dict:
    """Everything the report prints. pairs: (a, b) for the differences a - b (default: every
    later method minus each earlier one). target_gain: the cost table's target, a gain over each
    seed's own warm start (None: half the best method's mean gain at the last evaluation)."""
    seeds = complete_seeds(runs, methods)
    if not seeds:
        raise ValueError(f"no seed has a finished run of every method {methods}")
    grid = sorted(set.intersection(*(set(runs[m][s]["steps"]) for m in methods for s in seeds)))
    at = {m: {s: dict(zip(runs[m][s]["steps"], runs[m][s]["acc"])) for s in seeds} for m in methods}
    shown = [step for step in report_steps if step in grid and step > 0]
    if grid[-1] not in shown:
        shown.append(grid[-1])
    auc = {m: {s: area_under_curve(grid, [at[m][s][g] for g in grid]) for s in seeds} for m in methods}
    drop = {m: {s: min(at[m][s][g] for g in grid if g > 0) - at[m][s][0] for s in seeds} for m in methods}
    summary: dict = {
        "seeds": seeds, "methods": methods, "grid": grid, "report_steps": shown,
        "incomplete": {m: sorted(set(runs.get(m, {})) - set(seeds)) for m in methods},
        "curve": {m: {g: _iv(mean_interval([at[m][s][g] for s in seeds])) for g in grid} for m in methods},
        "auc": {m: _iv(mean_interval(list(auc[m].values()))) for m in methods},
        "drop": {m: _iv(mean_interval(list(drop[m].values()))) for m in methods},
        "drop_seeds_below": {m: sum(d < 0 for d in drop[m].values()) for m in methods},
        "per_seed": {m: {s: {"acc": at[m][s], "auc": auc[m][s], "drop": drop[m][s]} for s in seeds} for m in methods},
        "pairs": [],
    }
    if pairs is None:
        pairs = [(b, a) for i, a in enumerate(methods) for b in methods[i + 1:]]
    for a, b in pairs:
        row = {"a": a, "b": b, "steps": {}, "auc": None}
        for g in shown:
            row["steps"][g] = _pair(paired_difference({s: at[a][s][g] for s in seeds}, {s: at[b][s][g] for s in seeds}))
        row["auc"] = _pair(paired_difference(auc[a], auc[b]))
        summary["pairs"].append(row)
    # the target is relative to each seed's warm start: the warm starts differ by seed more than
    # the methods' gains, so an absolute target would be met at step 0 by some seeds and never by others
    best_gain = max(mean_interval([at[m][s][grid[-1]] - at[m][s][0] for s in seeds]).mean for m in methods)
    summary["target_gain"] = target_gain if target_gain is not None else best_gain / 2
    summary["target_default"] = target_gain is None
    summary["cost"] = {m: _cost(runs[m], seeds, summary["target_gain"]) for m in methods}
    summary["passk"] = _passk_summary(curves, seeds)
    return summary


def _pair(diff) -> dict:
    return {**_iv(diff.interval), "wins": diff.wins, "ties": diff.ties, "losses": diff.losses,
            "diffs": diff.diffs}


def _cost(method_runs: dict, seeds: list, gain: float) -> dict:
    """Rollout FLOPs / tokens / steps to the first evaluation after step 0 at or above the
    seed's own step-0 accuracy + `gain`."""
    reached = {}
    for s in seeds:
        run = method_runs[s]
        step = first_reaching(run["steps"][1:], run["acc"][1:], run["acc"][0] + gain)
        if step is not None:
            i = run["steps"].index(step)
            reached[s] = {"step": step, "flops": run["flops"][i], "tokens": run["tokens"][i]}
    return {"reached": len(reached), "of": len(seeds), "per_seed": reached,
            "step": _iv(mean_interval([r["step"] for r in reached.values()])),
            "flops": _iv(mean_interval([r["flops"] for r in reached.values()])),
            "tokens": _iv(mean_interval([r["tokens"] for r in reached.values()])),
            "run_flops": _iv(mean_interval([method_runs[s]["flops"][-1] for s in seeds])),
            "run_tokens": _iv(mean_interval([method_runs[s]["tokens"][-1] for s in seeds]))}


def _passk_summary(curves: dict, seeds: list) -> dict:
    """Mean pass@k with intervals per split and model, and the crossover per seed."""
    seeds = [s for s in seeds if s in curves] or sorted(curves)
    out: dict = {}
    if not seeds:
        return out
    for split in curves[seeds[0]]:
        per = [curves[s][split] for s in seeds if split in curves[s]]
        num_k = len(per[0]["learner"])
        entry = {model: [_iv(mean_interval([c[model][k] for c in per])) for k in range(num_k)]
                 for model in ("learner", "explorer")}
        cross = {s: crossover_k(curves[s][split]["learner"], curves[s][split]["explorer"]) for s in seeds}
        entry["crossover"] = cross
        entry["learner_ahead_at_1"] = sum(curves[s][split]["learner"][0] > curves[s][split]["explorer"][0]
                                          for s in seeds)
        entry["explorer_ahead_at_k"] = sum(curves[s][split]["explorer"][-1] > curves[s][split]["learner"][-1]
                                           for s in seeds)
        entry["seeds"] = seeds
        out[split] = entry
    return out


# ----------------------------------------------------------------------------- printing


def _text(iv: dict, digits: int = 3) -> str:
    return Interval(mean=iv["mean"], low=iv["low"], high=iv["high"], n=iv["n"]).text(digits)


def _sci(iv: dict) -> str:
    if iv["n"] == 0:
        return "-"
    if math.isnan(iv["low"]):
        return f"{iv['mean']:.3g}"
    return f"{iv['mean']:.3g} [{iv['low']:.3g}, {iv['high']:.3g}]"


def _pair_text(p: dict) -> str:
    if p["n"] == 0:
        return "-"
    body = f"{p['mean']:+.3f}"
    if not math.isnan(p["low"]):
        body += f" [{p['low']:+.3f}, {p['high']:+.3f}]"
    return f"{body} ({p['wins']}/{p['n']} > 0)"


def _table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def print_report(summary: dict) -> None:
    seeds, shown, grid = summary["seeds"], summary["report_steps"], summary["grid"]
    n = len(seeds)
    print(f"\nheld-out avg@k Pass@1, mean [95% t-interval over {n} seeds {seeds}] "
          f"(recipe {summary.get('config', '?')})")
    for m, missing in summary["incomplete"].items():
        if missing:
            print(f"  (left out: {m} also finished seeds {missing}, not every method did)")
    _table(["method", "step 0"] + [f"step {g}" for g in shown] + ["area (mean over steps)", "lowest - step 0"],
           [[m, _text(summary["curve"][m][0])] + [_text(summary["curve"][m][g]) for g in shown]
            + [_text(summary["auc"][m]), f"{_text(summary['drop'][m])} ({summary['drop_seeds_below'][m]}/{n} < 0)"]
            for m in summary["methods"]])
    print("\npaired per-seed differences, mean [95% t-interval] (seeds with difference > 0)")
    _table(["difference"] + [f"step {g}" for g in shown] + ["area"],
           [[f"{p['a']} - {p['b']}"] + [_pair_text(p["steps"][g]) for g in shown] + [_pair_text(p["auc"])]
            for p in summary["pairs"]])
    gain = summary["target_gain"]
    how = "half the best method's mean gain at the last evaluation" if summary["target_default"] else "--target-gain"
    print(f"\nrollout cost to the first evaluation >= the seed's step 0 {gain:+.3f} ({how}); mean [95% t-interval] "
          "over the seeds that reached it")
    _table(["method", "reached", "step", "rollout FLOPs", "rollout tokens", "whole-run FLOPs"],
           [[m, f"{c['reached']}/{c['of']}", _sci(c["step"]), _sci(c["flops"]), _sci(c["tokens"]),
             _sci(c["run_flops"])] for m, c in summary["cost"].items()])
    print("\ncurve (all evaluations): mean [95% t-interval]")
    _table(["step"] + summary["methods"],
           [[str(g)] + [_text(summary["curve"][m][g]) for m in summary["methods"]] for g in grid])
    for split, entry in summary["passk"].items():
        ks = [k for k in PASSK_SHOWN if k <= len(entry["learner"])]
        print(f"\npass@k at initialisation, {split} problems, mean [95% t-interval over {len(entry['seeds'])} seeds]")
        _table(["model"] + [f"k={k}" for k in ks],
               [[model] + [_text(entry[model][k - 1]) for k in ks] for model in ("learner", "explorer")])
        cross = entry["crossover"]
        print(f"learner ahead at k=1 in {entry['learner_ahead_at_1']}/{len(cross)} seeds, explorer ahead at "
              f"k={len(entry['learner'])} in {entry['explorer_ahead_at_k']}/{len(cross)}; crossover k per seed: "
              + ", ".join(f"{s}: {k if k is not None else '-'}" for s, k in cross.items()))


# ----------------------------------------------------------------------------- files


def write_outputs(summary: dict, runs: dict, curves: dict, out: str) -> list[str]:
    files = []
    path = os.path.join(out, "summary.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1, default=str)
    files.append(path)
    path = os.path.join(out, "curves.csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "seed", "step", "acc", "rollout_flops", "rollout_tokens"])
        for m, per_seed in runs.items():
            for s, run in sorted(per_seed.items()):
                for row in zip(run["steps"], run["acc"], run["flops"], run["tokens"]):
                    w.writerow([m, s, *row])
    files.append(path)
    path = os.path.join(out, "passk_init.csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seed", "split", "model", "k", "pass_at_k"])
        for s, per_split in sorted(curves.items()):
            for split, models in per_split.items():
                for model, curve in models.items():
                    for k, value in enumerate(curve, start=1):
                        w.writerow([s, split, model, k, f"{value:.6f}"])
    files.append(path)
    files += _plots(summary, out)
    return files


def _plots(summary: dict, out: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the CSV files hold the same numbers
        return []
    grid, n = summary["grid"], len(summary["seeds"])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m in summary["methods"]:
        c = [summary["curve"][m][g] for g in grid]
        ax.plot(grid, [v["mean"] for v in c], marker="o", ms=3, label=m)
        if n > 1:
            ax.fill_between(grid, [v["low"] for v in c], [v["high"] for v in c], alpha=0.2)
    ax.set_ylim(0.0, min(1.0, ax.get_ylim()[1]))  # an interval reaching past [0, 1] is cut at the frame
    ax.set_xlabel("step")
    ax.set_ylabel("held-out avg@k Pass@1 (learner)")
    ax.set_title(f"mean and 95% t-interval over {n} seeds", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths = [os.path.join(out, "accuracy.png")]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)
    if summary["passk"]:
        splits = list(summary["passk"])
        fig, axes = plt.subplots(1, len(splits), figsize=(4.6 * len(splits), 3.8), squeeze=False)
        for ax, split in zip(axes[0], splits):
            entry = summary["passk"][split]
            ks = list(range(1, len(entry["learner"]) + 1))
            for model in ("learner", "explorer"):
                ax.plot(ks, [v["mean"] for v in entry[model]], label=model)
                if len(entry["seeds"]) > 1:
                    ax.fill_between(ks, [v["low"] for v in entry[model]], [v["high"] for v in entry[model]], alpha=0.2)
            ax.set_xscale("log", base=2)
            ax.set_ylim(0.0, 1.0)
            ax.set_xlabel("k")
            ax.set_ylabel("pass@k")
            ax.set_title(f"{split} problems, at initialisation ({len(entry['seeds'])} seeds)", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        paths.append(os.path.join(out, "passk_init.png"))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths
