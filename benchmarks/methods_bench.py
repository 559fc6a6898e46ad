"""GRPO, S2L-PO and token-level temperature over seeds: held-out accuracy with 95% intervals.

Run (from the repository root; about an hour on a quiet 2-core machine with the defaults):

    .venv/bin/python benchmarks/methods_bench.py                           # paper-shaped recipe, 5 seeds
    .venv/bin/python benchmarks/methods_bench.py --recipe strong_explorer  # the older recipe (tiny_cpu.yaml)
    .venv/bin/python benchmarks/methods_bench.py --seeds 2 --steps 60      # a shorter pilot
    .venv/bin/python benchmarks/methods_bench.py --methods grpo \\
        --arm 'grpo_lr3e-4: algo.t_mix=0 learner.optim.lr=3e-4'           # an ablation arm next to GRPO
    .venv/bin/python benchmarks/methods_bench.py --report-only             # summarise what is there

For every seed S (1..--seeds, or --seed-list) it builds the two warm-started models once
(`rollout.{learner,explorer}.init_seed` = S and S + 1 with `--init seed`, the default; the
recipe's own with `--init recipe`), measures their pass@k (k = 1..--k) on the held-out and
the train problems, then runs `s2lpo train RECIPE` once per method from those models:

  grpo         algo.t_mix=0
  temperature  algo.t_mix=0 and the learner's sampling temperature annealed linearly from
               --temperature to the recipe's over algo.t_mix steps (the token-level diversity
               baseline; same steps, prompts and group size, so the same number of samples)
  s2lpo        the recipe as written (its explorer share annealed over algo.t_mix steps)
  --arm 'NAME: OVERRIDE ...'  any further arm (dotted overrides, shell-quoted)

Every run evaluates the learner before training (step 0) and every run.eval_every steps at
run.eval_temperature (the recipe's learner temperature for every method), with the same
per-sample seeds; run.seed = data.seed = S, so two methods of one seed share the warm start and
the prompt order, and their difference is paired.

Resuming: each run lives in <out>/seed_<S>/<method> with the settings it was started with
(bench_run.json). A finished run is reused; an unfinished one continues with `s2lpo train
--resume` from its newest checkpoint (run.save_every defaults to run.eval_every here); a run
whose settings differ from this invocation's is refused, naming the differences (use another
--out). Nothing in a used run directory is deleted.

Printed (and written to <out>/summary.json, curves.csv, passk_init.csv, accuracy.png,
passk_init.png): mean held-out avg@k Pass@1 per method and step with its 95% Student
t-interval over seeds (methods_stats.py); paired per-seed differences (--pairs) at --report-steps
and of the area under the accuracy curve (its mean height, step 0 included); the largest drop below
the warm start; rollout FLOPs and tokens (2 x params x tokens of every generated sample,
explorer + learner, from the runs' cumulative counters) to the first evaluation at or above
the seed's own step-0 accuracy + --target-gain (default: half the best method's mean gain at
the last evaluation; a gain, because the warm starts differ by seed more than the methods do);
and the explorer's and learner's pass@k curves at initialisation with the k from
which the explorer stays ahead (the crossover).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from methods_report import print_report, summarize, write_outputs  # noqa: E402

from megatron_s2lpo.config import config_from_dict, load_config  # noqa: E402
from megatron_s2lpo.trainer.metrics import METRICS_FILE, read_metrics  # noqa: E402

RECIPES = {"paper": "examples/tiny_cpu_paper.yaml", "strong_explorer": "examples/tiny_cpu.yaml"}
DEFAULT_METHODS = ("grpo", "temperature", "s2lpo")
RUN_FILE = "bench_run.json"
KEY_FILE = "warm_start.json"
PASSK_FILE = "passk_init.json"
NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")
# settings that may differ between two invocations of the same comparison
VOLATILE = ("run.output_dir", "run.name", "run.resume")


class BenchError(Exception):
    """A refusal or failure the bench reports as one message (no traceback)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=sorted(RECIPES), default="paper",
                   help="named tiny recipe (default paper: examples/tiny_cpu_paper.yaml)")
    p.add_argument("--config", default="", help="a YAML recipe instead of --recipe")
    p.add_argument("--seeds", type=int, default=5, help="seeds 1..N (default 5)")
    p.add_argument("--seed-list", default="", help="comma-separated seeds instead of --seeds")
    p.add_argument("--steps", type=int, default=0, help="steps per run (default: the recipe's run.num_steps)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma-separated methods, the first is the baseline (default grpo,temperature,s2lpo)")
    p.add_argument("--arm", action="append", default=[], metavar="'NAME: OVERRIDE ...'",
                   help="an extra method: a name and dotted overrides (repeatable; added to --methods)")
    p.add_argument("--temperature", type=float, default=1.5,
                   help="start temperature of the token-level baseline (default 1.5)")
    p.add_argument("--init", choices=("seed", "recipe"), default="seed",
                   help="warm starts per seed (init_seed = S, S + 1) or the recipe's for every seed")
    p.add_argument("--k", type=int, default=64, help="pass@k at initialisation for k = 1..K (default 64)")
    p.add_argument("--passk-splits", default="heldout,train", help="problem sets of the pass@k curves")
    p.add_argument("--target-gain", type=float, default=None,
                   help="the cost-to-target table's target: a gain in held-out accuracy over each seed's own warm "
                        "start (default: half the best method's mean gain at the last evaluation)")
    p.add_argument("--report-steps", default="20,100,200", help="steps of the summary table (and the last)")
    p.add_argument("--pairs", default="",
                   help="paired differences to show, 'A:B,...' for A - B (default: every method minus the first, "
                        "and s2lpo - temperature)")
    p.add_argument("--out", default="", help="output directory (default runs/methods_bench/<recipe>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override for every run (repeatable)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per run (OMP_NUM_THREADS; default 1: the tiny models gain nothing from more, "
                        "and results then do not depend on the machine's core count)")
    p.add_argument("--report-only", action="store_true", help="train nothing; summarise the finished runs")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.steps < 0:
        p.error(f"--steps must be >= 0, got {args.steps}")
    if args.k < 1:
        p.error(f"--k must be >= 1, got {args.k}")
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.temperature <= 0:
        p.error(f"--temperature must be > 0, got {args.temperature}")
    try:
        args.seed_values = ([int(s) for s in args.seed_list.split(",") if s.strip()] if args.seed_list
                            else list(range(1, args.seeds + 1)))
        args.report_step_values = [int(s) for s in args.report_steps.split(",") if s.strip()]
    except ValueError as e:
        p.error(f"--seed-list / --report-steps take comma-separated integers ({e})")
    if len(set(args.seed_values)) != len(args.seed_values):
        p.error(f"--seed-list repeats a seed: {args.seed_list}")
    args.passk_split_values = [s for s in args.passk_splits.split(",") if s]
    if not set(args.passk_split_values) <= {"heldout", "train"}:
        p.error(f"--passk-splits takes heldout and/or train, got {args.passk_splits!r}")
    try:
        args.extra_arms = dict(parse_arm(spec) for spec in args.arm)
    except ValueError as e:
        p.error(str(e))
    methods = [m for m in args.methods.split(",") if m]
    methods += [name for name in args.extra_arms if name not in methods]
    unknown = [m for m in methods if m not in DEFAULT_METHODS and m not in args.extra_arms]
    if unknown or not methods or len(set(methods)) != len(methods):
        p.error(f"--methods {args.methods!r}: each of {list(DEFAULT_METHODS)} or an --arm name, once "
                f"(unknown: {unknown})")
    args.method_list = methods
    if args.pairs:
        args.pair_list = [tuple(pair.split(":")) for pair in args.pairs.split(",") if pair]
        bad = [p for p in args.pair_list if len(p) != 2 or not set(p) <= set(methods) or p[0] == p[1]]
        if bad:
            p.error(f"--pairs {args.pairs!r}: each pair is A:B with two different methods of {methods}")
    else:
        args.pair_list = [(m, methods[0]) for m in methods[1:]]
        if {"s2lpo", "temperature"} <= set(methods[1:]):
            args.pair_list.append(("s2lpo", "temperature"))
    name = os.path.splitext(os.path.basename(args.config))[0] if args.config else args.recipe
    args.config = os.path.abspath(args.config or os.path.join(REPO_ROOT, RECIPES[args.recipe]))
    if not os.path.isfile(args.config):
        p.error(f"--config {args.config}: no such file")
    args.out = os.path.abspath(args.out or os.path.join(REPO_ROOT, "runs", "methods_bench", name))
    return args


def parse_arm(spec: str) -> tuple[str, list[str]]:
    """'NAME: a.b=1 c.d=2' -> ('NAME', ['a.b=1', 'c.d=2'])."""
    name, sep, rest = spec.partition(":")
    name = name.strip()
    if not sep or not NAME_RE.match(name) or name in DEFAULT_METHODS:
        raise ValueError(f"--arm {spec!r}: expected 'NAME: OVERRIDE ...' with NAME of letters, digits, "
                         f"'_.+-' and not one of {list(DEFAULT_METHODS)}")
    overrides = shlex.split(rest)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"--arm {spec!r}: {bad} are not dotted overrides (section.field=value)")
    return name, overrides


# ----------------------------------------------------------------------------- settings


def common_overrides(args: argparse.Namespace) -> list[str]:
    """Every run: step-0 evaluation at the recipe's learner temperature, checkpoints at each eval."""
    cfg = load_config(args.config, args.overrides)
    out = ["run.eval_at_start=true"]
    if cfg.run.eval_temperature is None:
        out.append(f"run.eval_temperature={cfg.rollout.learner.sampling.temperature}")
    if not any(o.startswith("run.save_every=") for o in args.overrides) and cfg.run.eval_every:
        out.append(f"run.save_every={cfg.run.eval_every}")
    if args.steps:
        out.append(f"run.num_steps={args.steps}")
    return out + list(args.overrides)


def arm_overrides(method: str, args: argparse.Namespace, base: list[str]) -> list[str]:
    cfg = load_config(args.config, base)
    if method == "grpo":
        return ["algo.t_mix=0"]
    if method == "s2lpo":
        if not cfg.algo.t_mix:
            raise BenchError(f"{args.config}: algo.t_mix is 0, so the recipe is plain GRPO; give S2L-PO a "
                             "share (--set algo.t_mix=N) or leave s2lpo out of --methods")
        return []
    if method == "temperature":
        steps = cfg.algo.t_mix or cfg.run.num_steps // 2
        return ["algo.t_mix=0", f"rollout.learner.sampling.temperature={args.temperature}",
                "algo.temperature.schedule=linear",
                f"algo.temperature.end={cfg.rollout.learner.sampling.temperature}",
                f"algo.temperature.steps={steps}"]
    return list(args.extra_arms[method])


def seed_overrides(seed: int, args: argparse.Namespace, models: dict[str, str]) -> list[str]:
    out = [f"run.seed={seed}", f"data.seed={seed}"]
    if args.init == "seed":
        out += [f"rollout.learner.init_seed={seed}", f"rollout.explorer.init_seed={seed + 1}"]
    return out + [f"rollout.{name}.model_path={path}" for name, path in models.items()]


def settings_dict(cfg, out: str) -> dict:
    """The resolved config, flattened, without the entries that may differ between invocations;
    paths under `out` (the warm starts) relative to it, so a moved comparison still resumes."""
    flat: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and value:
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), sub)
        elif prefix not in VOLATILE:
            if isinstance(value, str) and value.startswith(out + os.sep):
                value = "<out>" + value[len(out):]
            flat[prefix] = value

    walk("", cfg.to_dict())
    return json.loads(json.dumps(flat, default=str))


def default_settings() -> dict:
    """Every config field at its default, flattened as settings_dict does."""
    return settings_dict(config_from_dict({}), "")


def differences(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for each setting that differs. A key that `old` lacks and `new` holds at
    its default is no difference: the field was added to the config after that run started, and
    a new field's default keeps the behaviour the code had before it (so merging code that adds
    options does not orphan a half-finished comparison)."""
    keys = sorted(set(old) | set(new))
    defaults = default_settings() if set(new) - set(old) else {}
    absent = "(absent)"
    return [f"{k}: {old.get(k, absent)!r} -> {new.get(k, absent)!r}" for k in keys
            if old.get(k, absent) != new.get(k, absent)
            and not (k not in old and k in new and k in defaults and new[k] == defaults[k])]


# ----------------------------------------------------------------------------- warm starts


def warm_start_key(cfg) -> dict:
    parts = {name: {k: v for k, v in dataclasses.asdict(getattr(cfg.rollout, name)).items()
                    if k.startswith("init_")} for name in ("learner", "explorer")}
    parts["synthetic"] = dataclasses.asdict(cfg.data.synthetic)
    return json.loads(json.dumps(parts, default=str))


def warm_start_dir(out: str, cfg) -> str:
    """<out>/warm_starts/<init seeds>-<hash of the warm-start settings>: one per distinct warm start."""
    key = json.dumps(warm_start_key(cfg), sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    r = cfg.rollout
    return os.path.join(out, "warm_starts", f"l{r.learner.init_seed}-e{r.explorer.init_seed}-{digest}")


def prepare_models(warm_dir: str, cfg) -> dict[str, str]:
    """Build (once) the learner and explorer of `cfg` under warm_dir/models; refuse a warm_dir
    whose models were built with other settings."""
    from megatron_s2lpo.trainer.build import build_tokenizer, materialize_model

    key = warm_start_key(cfg)
    key_path = os.path.join(warm_dir, KEY_FILE)
    if os.path.isfile(key_path):
        with open(key_path) as f:
            old = json.load(f)
        if old != key:
            raise BenchError(f"{warm_dir} holds warm starts built with other settings:\n  "
                             + "\n  ".join(differences(_flat(old), _flat(key)))
                             + "\nuse another --out, or remove that directory and the runs built on it")
    os.makedirs(warm_dir, exist_ok=True)
    build_cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, output_dir=warm_dir))
    tokenizer = build_tokenizer(cfg)
    paths = {}
    for name in ("learner", "explorer"):
        engine = getattr(cfg.rollout, name)
        paths[name] = engine.model_path or materialize_model(engine, name, build_cfg, tokenizer)
    with open(key_path, "w") as f:
        json.dump(key, f, indent=1, sort_keys=True)
    return paths


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def init_passk(cfg, models: dict[str, str], k: int, splits: list[str], path: str) -> dict:
    """{split: {model: [pass@1..pass@k]}} of both warm starts (cached in `path` with its settings)."""
    from megatron_s2lpo.algo.passk import pass_at_k_curve
    from megatron_s2lpo.reward import MathScorer
    from megatron_s2lpo.rollout import LocalEngine
    from megatron_s2lpo.trainer.build import build_prompts, build_tokenizer, eval_sampling, sample_scores

    key = {"k": k, "splits": splits, "seed": cfg.run.seed, "models": warm_start_key(cfg),
           "sampling": dataclasses.asdict(eval_sampling(cfg))}
    key = json.loads(json.dumps(key, default=str))
    if os.path.isfile(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get("key") == key:
            return cached["curves"]
    tokenizer = build_tokenizer(cfg)
    train, heldout = build_prompts(cfg, tokenizer)
    prompts = {"heldout": heldout, "train": train}
    curves: dict = {split: {} for split in splits}
    with MathScorer(num_workers=cfg.run.reward_workers, **cfg.reward.scorer_kwargs()) as scorer:
        for name, model_dir in models.items():
            engine = LocalEngine.from_pretrained(model_dir, tokenizer=tokenizer, seed=cfg.run.seed)
            try:
                for split in splits:
                    scores = sample_scores(engine, prompts[split], k, eval_sampling(cfg), scorer, cfg.run.seed,
                                           tag=f"passk-{split}")
                    curves[split][name] = pass_at_k_curve([int(sum(s)) for s in scores], k, k)
            finally:
                engine.close()
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"key": key, "curves": curves}, f)
    os.replace(tmp, path)
    return curves


# ----------------------------------------------------------------------------- runs


def run_state(run_dir: str, num_steps: int) -> str:
    """'new' (nothing logged), 'finished' (the last step evaluated) or 'unfinished'."""
    path = os.path.join(run_dir, METRICS_FILE)
    records = read_metrics(path) if os.path.isfile(path) else []
    last = [r for r in records if r["step"] == num_steps and r.get("eval/avg_at_k") is not None]
    if last:
        return "finished"
    return "unfinished" if records else "new"


def train_run(run_dir: str, log_path: str, config: str, overrides: list[str], settings: dict,
              num_steps: int, threads: int) -> str:
    """Run, resume or reuse one method x seed; returns what it did."""
    settings_path = os.path.join(run_dir, RUN_FILE)
    state = run_state(run_dir, num_steps)
    if os.path.isfile(settings_path):
        with open(settings_path) as f:
            old = json.load(f)["settings"]
        diff = differences(old, settings)
        if diff:
            raise BenchError(f"{run_dir} was started with other settings:\n  " + "\n  ".join(diff[:20])
                             + "\nuse another --out for this comparison (nothing was changed)")
    elif state != "new":
        raise BenchError(f"{run_dir} holds a run this bench did not start (no {RUN_FILE}); use another --out")
    if state == "finished":
        return "reused"
    os.makedirs(run_dir, exist_ok=True)
    if not os.path.isfile(settings_path):
        with open(settings_path, "w") as f:
            json.dump({"config": config, "overrides": overrides, "settings": settings}, f, indent=1)
    cmd = [sys.executable, "-m", "megatron_s2lpo.cli", "train", config, *overrides, f"run.output_dir={run_dir}",
           "--resume"]  # --resume on an unused directory starts at step 1
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(shlex.quote(c) for c in cmd)}\n")
        log.flush()
        rc = subprocess.call(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                             env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if rc != 0:
        with open(log_path) as f:
            tail = f.read()[-2500:]
        hint = ""
        if "no checkpoint that can be loaded" in tail:
            hint = (f"\nthe run stopped before its first checkpoint; remove {run_dir} to run it again from "
                    "step 1 (it holds nothing a checkpoint kept)")
        raise BenchError(f"s2lpo train failed (exit {rc}) in {run_dir}; log {log_path}:\n{tail}{hint}")
    if run_state(run_dir, num_steps) != "finished":
        raise BenchError(f"s2lpo train ended without the step-{num_steps} evaluation in {run_dir}; log {log_path}")
    return "resumed" if state == "unfinished" else "trained"


def load_run(run_dir: str) -> dict:
    """Eval steps, accuracies and cumulative rollout FLOPs/tokens (explorer + learner) at each."""
    records = read_metrics(os.path.join(run_dir, METRICS_FILE))
    steps, acc, flops, tokens = [], [], [], []
    for r in records:
        if r.get("eval/avg_at_k") is None:
            continue
        steps.append(r["step"])
        acc.append(float(r["eval/avg_at_k"]))
        flops.append(sum(float(r.get(f"cumulative/rollout_flops/{s}") or 0.0) for s in ("explorer", "learner")))
        tokens.append(sum(float(r.get(f"cumulative/rollout_tokens/{s}") or 0.0) for s in ("explorer", "learner")))
    return {"steps": steps, "acc": acc, "flops": flops, "tokens": tokens}


def plan(args: argparse.Namespace) -> tuple[list[str], dict[str, list[str]], int]:
    """(common overrides, {method: overrides}, num_steps), every method's config validated."""
    try:
        base = common_overrides(args)
        arms = {m: arm_overrides(m, args, base) for m in args.method_list}
    except ValueError as e:  # a bad --set: the config loader names the field
        raise BenchError(str(e)) from e
    num_steps = 0
    for method, extra in arms.items():
        try:
            cfg = load_config(args.config, base + extra)
        except ValueError as e:
            raise BenchError(f"method {method}: {e}") from e
        if not cfg.run.eval_every or not cfg.data.synthetic.num_eval or cfg.data.train_path:
            raise BenchError("the bench needs the synthetic task with held-out prompts and evaluation: "
                             "data.train_path empty, data.synthetic.num_eval > 0, run.eval_every > 0")
        num_steps = cfg.run.num_steps
    return base, arms, num_steps


def model_paths(out: str, cfg) -> dict[str, str]:
    """Where the learner's and explorer's warm starts of `cfg` live (given, or built under `out`)."""
    warm_dir = warm_start_dir(out, cfg)
    return {name: getattr(cfg.rollout, name).model_path or os.path.join(warm_dir, "models", name)
            for name in ("learner", "explorer")}


def seed_runs(seed: int, args: argparse.Namespace, base: list[str], arms: dict[str, list[str]]) -> dict:
    """{method: (run_dir, overrides, settings, config)} of one seed; nothing is built."""
    out = {}
    for method, extra in arms.items():
        cfg = load_config(args.config, base + extra + seed_overrides(seed, args, {}))
        overrides = (base + extra + seed_overrides(seed, args, model_paths(args.out, cfg))
                     + [f"run.name={method}-seed{seed}"])
        run_dir = os.path.join(args.out, f"seed_{seed}", method)
        settings = settings_dict(load_config(args.config, overrides + [f"run.output_dir={run_dir}"]), args.out)
        out[method] = (run_dir, overrides, settings, cfg)
    return out


def run_seed(seed: int, args: argparse.Namespace, base: list[str], arms: dict[str, list[str]],
             num_steps: int) -> tuple[dict, dict]:
    """Warm starts, pass@k at init and every method's run for one seed: ({method: run}, curves)."""
    seed_dir = os.path.join(args.out, f"seed_{seed}")
    os.makedirs(seed_dir, exist_ok=True)
    seed_cfg = load_config(args.config, base + seed_overrides(seed, args, {}))
    start = time.perf_counter()
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)  # the warm starts and pass@k curves, as the runs
    try:
        models = prepare_models(warm_start_dir(args.out, seed_cfg), seed_cfg)
        curves = init_passk(seed_cfg, models, args.k, args.passk_split_values, os.path.join(seed_dir, PASSK_FILE))
    finally:
        torch.set_num_threads(threads)
    print(f"[seed {seed}] warm starts and pass@1..{args.k}: {time.perf_counter() - start:.0f} s", flush=True)
    runs = {}
    for method, (run_dir, overrides, settings, cfg) in seed_runs(seed, args, base, arms).items():
        if warm_start_key(cfg) != warm_start_key(seed_cfg):  # a method with a warm start of its own
            torch.set_num_threads(args.threads)
            try:
                prepare_models(warm_start_dir(args.out, cfg), cfg)
            finally:
                torch.set_num_threads(threads)
        start = time.perf_counter()
        what = train_run(run_dir, os.path.join(seed_dir, f"{method}.log"), args.config, overrides, settings,
                         num_steps, args.threads)
        runs[method] = load_run(run_dir)
        acc = runs[method]["acc"]
        print(f"[seed {seed}] {method:>12}: {what} in {time.perf_counter() - start:.0f} s; held-out "
              f"step 0 {acc[0]:.3f} -> step {runs[method]['steps'][-1]} {acc[-1]:.3f}", flush=True)
    return runs, curves


def collect_finished(args: argparse.Namespace, base: list[str], arms: dict, num_steps: int) -> tuple[dict, dict]:
    """--report-only: the finished runs (of this invocation's settings) and cached pass@k curves."""
    runs: dict = {m: {} for m in arms}
    curves: dict = {}
    for seed in args.seed_values:
        for method, (run_dir, _, settings, _) in seed_runs(seed, args, base, arms).items():
            if run_state(run_dir, num_steps) != "finished":
                continue
            with open(os.path.join(run_dir, RUN_FILE)) as f:
                diff = differences(json.load(f)["settings"], settings)
            if diff:
                raise BenchError(f"{run_dir} was run with other settings:\n  " + "\n  ".join(diff[:20]))
            runs[method][seed] = load_run(run_dir)
        passk = os.path.join(args.out, f"seed_{seed}", PASSK_FILE)
        if os.path.isfile(passk):
            with open(passk) as f:
                curves[seed] = json.load(f)["curves"]
    return runs, curves


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        base, arms, num_steps = plan(args)
        if args.report_only:
            runs, curves = collect_finished(args, base, arms, num_steps)
        else:
            print(f"methods {list(arms)} x seeds {args.seed_values}, {num_steps} steps, recipe {args.config} "
                  f"-> {args.out}", flush=True)
            runs, curves = {m: {} for m in arms}, {}
            os.makedirs(args.out, exist_ok=True)
            for seed in args.seed_values:
                seed_runs, curves[seed] = run_seed(seed, args, base, arms, num_steps)
                for method, run in seed_runs.items():
                    runs[method][seed] = run
    except BenchError as e:
        print(f"methods_bench: {e}", file=sys.stderr)
        return 2
    try:
        summary = summarize(runs, curves, methods=list(arms), report_steps=args.report_step_values,
                            target_gain=args.target_gain, pairs=args.pair_list)
    except ValueError as e:
        print(f"methods_bench: {e} under {args.out}", file=sys.stderr)
        return 2
    summary["command"] = " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    summary["config"] = os.path.relpath(args.config, REPO_ROOT)
    print_report(summary)
    files = write_outputs(summary, runs, curves, args.out)
    print(f"\nfiles: {', '.join(files)}; total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
