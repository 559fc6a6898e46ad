"""Random-kill soak: N SIGKILLs of the trainer's whole process group at random points of one run, each
followed by `--resume`, then a last `--resume` to the end; the run must log exactly what the
uninterrupted run logged (timings aside): no step lost, no metric different.

A kill point is either a moment inside a step (0-0.3 s after the run logged a step, one or two
steps past the last one logged, so that the kills spread over the run) or, once the run is near
its end and otherwise one time in three, a moment of start-up (imports, building, loading the
checkpoint, the first sync: a delay drawn up to what the first run took to log its first step).
The staleness (0: rollouts in the step, 1: a step ahead, the pending rollouts saved with each
checkpoint) is drawn too unless set.

    S2LPO_SOAK_KILLS=10 S2LPO_SOAK_SEED=7 .venv/bin/python -m pytest tests/faults/test_fault_soak.py -q -s
    S2LPO_SOAK_STALENESS=1 ...                       # only the one-step pipeline

N (S2LPO_SOAK_KILLS, default 3, kept small for CI's time budget) and the seed (S2LPO_SOAK_SEED,
default: drawn, so that CI keeps trying new points) are printed with the figures: kills survived,
steps lost, metrics that differ.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
from fault_runs import AHEAD, NUM_STEPS, REPO_ROOT, RUN_TIMEOUT_S, command, copy_run, differences, metrics, train
from process_control import signal_after_lines

KILLS = int(os.environ.get("S2LPO_SOAK_KILLS", "3"))
SEED = int(os.environ.get("S2LPO_SOAK_SEED") or random.SystemRandom().randrange(10**6))
STALENESS = os.environ.get("S2LPO_SOAK_STALENESS", "")


@pytest.mark.slow
@pytest.mark.timeout(1800 + 300 * KILLS)
def test_random_kills_lose_no_step_and_change_no_metric(reference, tmp_path: Path, capsys) -> None:
    rng = random.Random(SEED)
    staleness = int(STALENESS) if STALENESS else rng.choice([0, 1])
    extra = AHEAD if staleness else []
    run = copy_run(reference["ahead" if staleness else "sync"], tmp_path / "run", models_only=True)
    points, startup_s = [], None
    for kill in range(KILLS):
        done = len(metrics(run))
        if startup_s is not None and (done >= NUM_STEPS - 1 or rng.random() < 1 / 3):
            lines, delay = 0, rng.uniform(0.0, startup_s)  # start-up
        else:
            lines, delay = min(done + rng.randint(1, 2), NUM_STEPS - 1), rng.uniform(0.0, 0.3)  # inside a step
        resume = ["--resume"] if kill else []
        start = time.monotonic()
        status, log = signal_after_lines(command(run, *extra, *resume), REPO_ROOT, run / "metrics.jsonl",
                                         num_lines=lines, sig=signal.SIGKILL, timeout_s=RUN_TIMEOUT_S, group=True,
                                         delay_s=delay)
        if startup_s is None:
            startup_s = time.monotonic() - start  # launch to the first kill: start-up and a step or two
        points.append(f"after line {lines} + {delay:.2f} s: " + ("killed" if status == -signal.SIGKILL else
                                                                 f"exit {status}"))
        assert status == -signal.SIGKILL, f"kill {kill + 1} missed the run ({points[-1]}):\n{log[-3000:]}"
    train(run, *extra, *(["--resume"] if KILLS else []))
    diff = differences(metrics(reference["ahead" if staleness else "sync"]), metrics(run))
    lost = [d for d in diff if d.endswith(": missing")]
    with capsys.disabled():
        print(f"\nsoak: N={KILLS} seed={SEED} staleness={staleness}: kills survived {len(points)}, steps lost "
              f"{len(lost)}, metrics that differ {len(diff) - len(lost)}\n  " + "\n  ".join(points)
              + f"\n  reproduce: S2LPO_SOAK_KILLS={KILLS} S2LPO_SOAK_SEED={SEED} S2LPO_SOAK_STALENESS={staleness} "
              ".venv/bin/python -m pytest tests/faults/test_fault_soak.py -q -s")
    assert diff == []
