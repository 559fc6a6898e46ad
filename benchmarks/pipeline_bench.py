"""One-step off-policy pipeline: step time with run.max_staleness=0 and 1 against a remote-like server.

Run (from the repository root):

    .venv/bin/python benchmarks/pipeline_bench.py                       # calibrate, then both modes (~2 min)
    .venv/bin/python benchmarks/pipeline_bench.py --latency-ms-per-token 40 --steps 12 --repeats 2 \
        --out-dir /tmp/pipeline-bench --json /tmp/pipeline-bench.json

Each run is `s2lpo train examples/tiny_cpu.yaml` as plain GRPO (algo.t_mix=0: the explorer is never
built, so the learner's engine is the only remote one) with the learner's rollouts served over real
HTTP on 127.0.0.1 by tests/protocol_server.py, which the trainer launches as its SGLang server
(rollout.learner.backend=sglang, weights pushed from disk after every update, as the recipe's
sync.transport says). The server runs with `--latency-ms-per-token MS`: a generation batch answers
no sooner than MS x its longest completion after it started, so generating costs what a GPU
server's batched decode costs in wall time while leaving this machine's cores to the learner.

Calibration (when --latency-ms-per-token is not given): a run of the same length without latency
measures the learner's train + sync time T and the reward time R; then MS = (T - R) /
max_new_tokens, so that the server's simulated decode plus scoring takes as long as training.
The tiny model's own compute hides inside the simulated decode (the server starts a batch's
clock when its last request arrived); what remains on top is the client's side of the HTTP
calls in the trainer's process, so G comes out somewhat above T. Choosing MS so that the
measured G equals T instead would leave almost no simulated decode on 2 cores (the CPU cost of
128 requests over HTTP is about T there), and generation would then compete with training for
the same cores instead of running elsewhere. The calibration run (or else the first
run) builds the learner's warm-started model (`--init-sft-steps`, fewer than the recipe's 150 to
keep the bench short: the timing does not depend on how well the model answers); every later run
reads that directory (rollout.learner.model_path), so all start from the same weights.

The simulated server still computes its tiny model on this machine's cores, so the trainer runs
with one torch thread (`--trainer-threads`, OMP_NUM_THREADS) next to the server's one: on 2 cores
the learner and the server then run side by side as on separate hardware, instead of three
threads thrashing over two cores whenever generation overlaps training.

Then, per repeat, the same recipe with the same seed in fresh output directories, run.max_staleness=0
then run.max_staleness=1, `--steps` steps each (eval off, one checkpoint at the end). Printed, as
medians over the steps after the first `--skip-steps` (pooled over the repeats):
  step     `time/step` of each mode;
  G        generate time of the staleness-0 run: `time/rollout` + `time/reward`;
  T        train + sync time of the staleness-0 run: `time/old_logprob` + `time/teacher` +
           `time/train` + `time/sync`;
  ratios   staleness-1 step / max(G, T) (target <= 1.15: the pipeline hides the shorter side)
           and staleness-1 step / staleness-0 step (target <= 0.65), next to G + T;
  and the staleness-1 run's `time/overlap`, `time/wait_rollout` and `time/wait_train` where logged.
`--real`: the learner's rollouts come from a REAL SGLang 0.5.23 server on this CPU instead (the
trainer launches it from .venv-sglang with the recipe's `profile: cpu`; no simulated latency and
no calibration: generation is the real server's own compute, on the same 2 cores as training):
    flock /tmp/s2lpo-heavy.lock .venv/bin/python benchmarks/pipeline_bench.py --real --steps 6
A trainer without `run.max_staleness` runs the staleness-0 half (its only mode) and reports the
staleness-1 half as not available, naming the config error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_s2lpo.config import load_config  # noqa: E402
from megatron_s2lpo.trainer.metrics import read_metrics  # noqa: E402
from megatron_s2lpo.utils.ports import server_ports  # noqa: E402

RECIPE = os.path.join("examples", "tiny_cpu.yaml")
SERVER = os.path.join("tests", "protocol_server.py")
G_KEYS = ("time/rollout", "time/reward")
T_KEYS = ("time/old_logprob", "time/teacher", "time/train", "time/sync")
PIPELINE_KEYS = ("time/overlap", "time/wait_rollout", "time/wait_train")


class ModeUnavailable(Exception):
    """The trainer refused the config of a mode (e.g. it has no run.max_staleness)."""


def run_overrides(*, latency_ms: float, steps: int, model_path: str, init_sft_steps: int,
                  real: bool = False) -> list[str]:
    """The recipe's overrides shared by every run of the bench (see the module docstring)."""
    server = [sys.executable, SERVER, "--latency-ms-per-token", f"{latency_ms:g}"]
    overrides = [f"run.num_steps={steps}", "run.save_every=0", "run.eval_every=0", "algo.t_mix=0",
                 "rollout.learner.backend=sglang", f"rollout.learner.port={server_ports(1)[0]}",
                 "rollout.learner.startup_timeout_s=900"]
    if not real:  # the protocol server with simulated decode time; else the recipe's real server
        overrides.append(f"rollout.learner.launch_command={json.dumps(server)}")
    if model_path:
        return overrides + [f"rollout.learner.model_path={model_path}"]
    return overrides + [f"rollout.learner.init_sft_steps={init_sft_steps}"]


def staleness_override(staleness: int, overrides: list[str]) -> list[str]:
    """`run.max_staleness=N` for a run with these overrides, or nothing for 0 on a trainer without
    the field (0 is then its only mode); ModeUnavailable naming the config error when the trainer
    refuses the run (checked in this process: a config error costs no trainer start)."""
    extra = [f"run.max_staleness={staleness}"]
    try:
        load_config(os.path.join(ROOT, RECIPE), [*overrides, *extra])
    except ValueError as err:
        if staleness == 0 and "max_staleness" in str(err):
            return []
        raise ModeUnavailable(f"run.max_staleness={staleness} is not available in this trainer: {err}") from None
    return extra


def train(name: str, overrides: list[str], root: str, args: argparse.Namespace) -> list[dict]:
    """One `s2lpo train` run in `root/name` (its output in `root/name.log`): its metrics lines."""
    out_dir = os.path.join(root, name)
    log_path = f"{out_dir}.log"
    command = [sys.executable, "-m", "megatron_s2lpo.cli", "train", RECIPE, f"run.output_dir={out_dir}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.trainer_threads)}
    start, timeout_s = time.perf_counter(), args.timeout_s
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
        finally:  # timed out or interrupted: the trainer and the server it launched go too
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if proc.returncode != 0:
        with open(log_path) as log:
            tail = log.read()[-3000:]
        why = f"timed out after {timeout_s:.0f} s" if proc.returncode == -signal.SIGKILL else f"exit {proc.returncode}"
        raise RuntimeError(f"run {name} failed ({why}); the end of {log_path}:\n{tail}")
    records = read_metrics(os.path.join(out_dir, "metrics.jsonl"))
    print(f"  {name}: {len(records)} steps in {time.perf_counter() - start:.0f} s (log {log_path})", flush=True)
    return records


def medians(records: list[dict], skip: int) -> dict[str, float]:
    """Median per figure over the steps after the first `skip` of each run (records: every run's
    lines, each with its `step`)."""
    rows = [r for r in records if r["step"] > skip]
    if not rows:
        raise ValueError(f"no steps left after skipping the first {skip}: raise --steps")
    out = {"step": statistics.median(r["time/step"] for r in rows),
           "G": statistics.median(sum(r.get(k, 0.0) for k in G_KEYS) for r in rows),
           "T": statistics.median(sum(r.get(k, 0.0) for k in T_KEYS) for r in rows),
           "reward": statistics.median(r.get("time/reward", 0.0) for r in rows),
           "num_steps": float(len(rows))}
    for key in PIPELINE_KEYS:
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:
            out[key] = statistics.median(values)
    return out


def calibrate(args: argparse.Namespace, root: str, max_new_tokens: int) -> tuple[float, str, dict]:
    """(latency ms per token, the model directory it built, the calibration figures)."""
    print(f"calibration: {args.calibration_steps} steps without latency", flush=True)
    overrides = run_overrides(latency_ms=0, steps=args.calibration_steps, model_path="",
                              init_sft_steps=args.init_sft_steps)
    records = train("calibrate", overrides + staleness_override(0, overrides), root, args)
    figures = medians(records, min(args.skip_steps, args.calibration_steps - 1))
    latency_ms = 1000 * max(figures["T"] - figures["reward"], 0.0) / max_new_tokens
    return latency_ms, os.path.join(root, "calibrate", "models", "learner"), figures


def run_modes(args: argparse.Namespace, root: str, latency_ms: float, model_path: str) -> dict:
    """Both modes, interleaved per repeat: {staleness: medians, or {"error": why}} (staleness 0
    must run; a staleness-1 run the trainer refuses or that fails is reported, not raised)."""
    records: dict[int, list[dict]] = {0: [], 1: []}
    errors: dict[int, str] = {}
    for repeat in range(1, args.repeats + 1):
        for staleness in (0, 1):
            if staleness in errors:
                continue
            overrides = run_overrides(latency_ms=latency_ms, steps=args.steps, model_path=model_path,
                                      init_sft_steps=args.init_sft_steps, real=args.real)
            name = f"staleness{staleness}-r{repeat}"
            try:
                records[staleness] += train(name, overrides + staleness_override(staleness, overrides), root, args)
            except (ModeUnavailable, RuntimeError) as err:
                if staleness == 0:
                    raise RuntimeError(str(err)) from None
                errors[staleness] = str(err)
                print(f"  {name}: {err}", flush=True)
                continue
            if not model_path:  # the first run built the model: every later one reads it
                model_path = os.path.join(root, name, "models", "learner")
    return {s: {"error": errors[s]} if s in errors else medians(records[s], args.skip_steps) for s in (0, 1)}


def report(latency_ms: float, calibration: dict | None, modes: dict) -> dict:
    """Print the figures; returns them (with the ratios) for --json."""
    sync, pipe = modes[0], modes[1]
    source = "given" if calibration is None else (
        f"calibrated without latency: T {calibration['T']:.3f} s, reward {calibration['reward']:.3f} s")
    print(f"\nlatency {latency_ms:.1f} ms/token ({source})")
    print(f"{'mode':<12} {'step s':>7} {'G s':>7} {'T s':>7} {'G+T s':>7} {'overlap':>8} {'wait_rollout s':>14} "
          f"{'wait_train s':>12}")
    print(f"{'staleness 0':<12} {sync['step']:>7.3f} {sync['G']:>7.3f} {sync['T']:>7.3f} "
          f"{sync['G'] + sync['T']:>7.3f}")
    result = {"latency_ms_per_token": latency_ms, "calibration": calibration, "staleness0": sync, "staleness1": pipe}
    if "error" in pipe:
        print(f"{'staleness 1':<12} not run: {pipe['error']}")
        return result
    logged = [pipe.get(key) for key in PIPELINE_KEYS]
    print(f"{'staleness 1':<12} {pipe['step']:>7.3f} {'':>7} {'':>7} {'':>7} " + " ".join(
        f"{'n/a' if v is None else f'{v:.3f}':>{w}}" for v, w in zip(logged, (8, 14, 12), strict=True)))
    bound = max(sync["G"], sync["T"])
    result["ratio_vs_max"] = pipe["step"] / bound
    result["ratio_vs_sync"] = pipe["step"] / sync["step"]
    print(f"staleness-1 step / max(G, T) = {pipe['step']:.3f} / {bound:.3f} = {result['ratio_vs_max']:.3f} "
          f"(target <= 1.15)")
    print(f"staleness-1 step / staleness-0 step = {pipe['step']:.3f} / {sync['step']:.3f} = "
          f"{result['ratio_vs_sync']:.3f} (target <= 0.65)")
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8, help="steps per run (default 8)")
    p.add_argument("--skip-steps", type=int, default=2, help="first steps of each run left out of the medians")
    p.add_argument("--latency-ms-per-token", type=float, default=None,
                   help="the server's simulated decode time; default: calibrated so generate ~ train time")
    p.add_argument("--calibration-steps", type=int, default=None, help="default: --steps")
    p.add_argument("--repeats", type=int, default=1, help="runs per mode, interleaved (default 1)")
    p.add_argument("--init-sft-steps", type=int, default=30, help="the learner's warm start (recipe: 150)")
    p.add_argument("--out-dir", default="", help="a new or empty directory for the runs (default: a temporary "
                                                 "one, removed after a successful run)")
    p.add_argument("--json", default="", help="also write the figures to this file as JSON")
    p.add_argument("--trainer-threads", type=int, default=1,
                   help="the trainer's torch threads (OMP_NUM_THREADS; the server computes with 1)")
    p.add_argument("--timeout-s", type=float, default=900, help="limit per run")
    p.add_argument("--real", action="store_true", help="a real SGLang server (CPU profile) serves the learner")
    args = p.parse_args(argv)
    if args.steps <= args.skip_steps:
        p.error(f"--steps ({args.steps}) must be larger than --skip-steps ({args.skip_steps})")
    if args.calibration_steps is None:
        args.calibration_steps = args.steps
    if args.calibration_steps < 2 or args.repeats < 1 or args.skip_steps < 0 or args.trainer_threads < 1:
        p.error("--calibration-steps must be >= 2, --repeats >= 1, --skip-steps >= 0 and --trainer-threads >= 1")
    if args.latency_ms_per_token is not None and args.latency_ms_per_token < 0:
        p.error(f"--latency-ms-per-token must be >= 0, got {args.latency_ms_per_token}")
    if args.out_dir and os.path.exists(args.out_dir) and (not os.path.isdir(args.out_dir) or os.listdir(args.out_dir)):
        p.error(f"--out-dir {args.out_dir} exists and is not an empty directory: name a new one (runs are "
                "never written over)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = os.path.abspath(args.out_dir) if args.out_dir else tempfile.mkdtemp(prefix="pipeline-bench-")
    os.makedirs(root, exist_ok=True)
    max_new_tokens = load_config(os.path.join(ROOT, RECIPE)).rollout.learner.sampling.max_new_tokens
    source = "a real SGLang 0.5.23 server (CPU profile)" if args.real else SERVER
    print(f"pipeline bench: {RECIPE} with algo.t_mix=0, the learner's rollouts from {source} over HTTP; "
          f"runs in {root}", flush=True)
    try:
        calibration, model_path = None, ""
        latency_ms = 0.0 if args.real else args.latency_ms_per_token
        if latency_ms is None:
            latency_ms, model_path, calibration = calibrate(args, root, max_new_tokens)
            print(f"  -> {latency_ms:.1f} ms/token x {max_new_tokens} tokens", flush=True)
        print(f"{args.repeats} x (staleness 0, staleness 1), {args.steps} steps each, the first "
              f"{args.skip_steps} left out", flush=True)
        result = report(latency_ms, calibration, run_modes(args, root, latency_ms, model_path))
    except (RuntimeError, ValueError) as err:
        print(f"pipeline bench: {err}\n(runs kept in {root})", file=sys.stderr)
        return 1
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if not args.out_dir:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
