"""Helpers of the fault-injection tier: what a user, a scheduler or a damaged disk does to a run,
and what the run must do then (never execute a file's pickle, fall back or refuse clearly, resume
exactly, end bounded, never interleave two runs, never print a secret).

One fixture (conftest.py) starts what the tier needs once (`reference`): the tiny recipe's models, built and
warm-started once, and two uninterrupted runs of it, one generating each step's rollouts in the
step (run.max_staleness=0) and one a step ahead (1), each with a checkpoint after every step. The
tests copy them, break the copy (plant, cut, flip, kill, signal) and compare what the copy's
resumed run logs with what the uninterrupted run logged. Under pytest-xdist the workers share the
build (a file lock in the session's shared temporary directory).

    .venv/bin/python -m pytest tests/faults -q
    S2LPO_SOAK_KILLS=10 S2LPO_SOAK_SEED=7 .venv/bin/python -m pytest tests/faults/test_fault_soak.py -q -s
"""

from __future__ import annotations

import os
import pickle
import shutil
import sys
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "tests" / "integration"))  # process_control, shared with that tier

from process_control import run_ok, without_timing  # noqa: E402

CONFIG = str(REPO_ROOT / "examples" / "tiny_cpu.yaml")
NUM_STEPS = 6
# The tiny recipe, small and quick, a checkpoint after every step (and all of them kept) so that a
# test can damage several and see the resume fall back past each.
OVERRIDES = [f"run.num_steps={NUM_STEPS}", "run.save_every=1", "run.keep_checkpoints=10", "run.eval_every=0",
             "data.prompts_per_step=4", "data.synthetic.num_eval=4", "algo.group_size=4", "algo.t_mix=4",
             "sync.parity_every=2", "rollout.learner.init_sft_steps=20", "rollout.explorer.init_sft_steps=40"]
AHEAD = ["run.max_staleness=1"]
RUN_TIMEOUT_S = 600  # generous: a loaded 2-core CI machine runs this recipe 10x slower than a quiet one


def command(output_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "megatron_s2lpo.cli", "train", CONFIG, *OVERRIDES, f"run.output_dir={output_dir}",
            *extra]


def train(output_dir: Path, *extra: str):
    return run_ok(command(output_dir, *extra), REPO_ROOT, timeout_s=RUN_TIMEOUT_S)


def metrics(run_dir: Path) -> list[dict]:
    from megatron_s2lpo.trainer.metrics import read_metrics

    path = run_dir / "metrics.jsonl"
    return read_metrics(str(path)) if path.is_file() else []


def differences(expected: list[dict], got: list[dict]) -> list[str]:
    """'step N: key' for every metric (timings aside) that differs, and every step missing or extra."""
    want = {r["step"]: without_timing(r) for r in expected}
    have = {r["step"]: without_timing(r) for r in got}
    out = [f"step {s}: missing" for s in sorted(set(want) - set(have))]
    out += [f"step {s}: extra" for s in sorted(set(have) - set(want))]
    for step in sorted(set(want) & set(have)):
        keys = set(want[step]) | set(have[step])
        out += [f"step {step}: {k} {want[step].get(k)!r} != {have[step].get(k)!r}" for k in sorted(keys)
                if want[step].get(k) != have[step].get(k)]
    return out


def copy_run(src: Path, dst: Path, *, models_only: bool = False) -> Path:
    """A copy of run `src` (or only its cached models: a fresh run that skips the warm start)."""
    if models_only:
        dst.mkdir(parents=True)
        shutil.copytree(src / "models", dst / "models")
    else:
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("run.lock", "sync"))
    return dst


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


class Planted:
    """Unpickling this runs code: it creates the file `canary`. A test passes only if it never exists."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self):
        return (os.system, (f"touch {self.canary}",))


def planted_bytes(canary: Path) -> bytes:
    return pickle.dumps(Planted(canary))
