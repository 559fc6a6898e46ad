"""The fault-injection tier's one fixture: `reference` (fault_runs.py says what it holds and why).

    .venv/bin/python -m pytest tests/faults -q
    S2LPO_SOAK_KILLS=10 S2LPO_SOAK_SEED=7 .venv/bin/python -m pytest tests/faults/test_fault_soak.py -q -s
    S2LPO_FAULT_REFERENCE=/tmp/fault-ref .venv/bin/python -m pytest tests/faults -q   # keep the runs between sessions

The reference runs depend on the code under test: keep them between sessions only while that
code does not change what a run logs.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import pytest
from fault_runs import AHEAD, NUM_STEPS, copy_run, metrics, train


@pytest.fixture(scope="session")
def reference(tmp_path_factory, worker_id) -> dict[str, Path]:
    """{"sync": run, "ahead": run}: the uninterrupted runs every test compares with (built once)."""
    if os.environ.get("S2LPO_FAULT_REFERENCE"):
        root = Path(os.environ["S2LPO_FAULT_REFERENCE"])
    else:
        root = tmp_path_factory.getbasetemp()
        if worker_id != "master":  # xdist: the session directory every worker shares
            root = root.parent
        root = root / "fault-reference"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = root / "done.json"
        if not done.is_file():
            sync, ahead = root / "sync", root / "ahead"
            for path in (sync, ahead):
                shutil.rmtree(path, ignore_errors=True)
            train(sync)
            copy_run(sync, ahead, models_only=True)
            train(ahead, *AHEAD)
            done.write_text(json.dumps({"sync": str(sync), "ahead": str(ahead)}))
        paths = {k: Path(v) for k, v in json.loads(done.read_text()).items()}
    assert [r["step"] for r in metrics(paths["sync"])] == list(range(1, NUM_STEPS + 1))
    return paths
