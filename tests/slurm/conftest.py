"""The Slurm tier: a real Slurm 22.05 with three emulated nodes, started once for the tier.

Runs as root with apt (CI does; `make test-slurm`, under the heavy-work lock); otherwise every
test here skips with the reason. The cluster is installed and started by the project's own
script (emulated_slurm.py) and stopped by PID at the end, which also checks that nothing is
left behind: no job, no daemon, no step process, no /etc/hosts entry, no file in /tmp.
"""

from __future__ import annotations

import glob
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.slurm.emulated_slurm import EmulatedSlurm, install, skip_reason

LEFTOVER_GLOBS = ("s2lpo-config-*", "s2lpo-stopped-*")


def _tmp_leftovers() -> set[str]:
    return {p for pattern in LEFTOVER_GLOBS for p in glob.glob(os.path.join(tempfile.gettempdir(), pattern))}


@pytest.fixture(scope="session")
def slurm_cluster():
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    start = time.monotonic()
    install()
    installed = time.monotonic()
    before = _tmp_leftovers()
    cluster = EmulatedSlurm(Path(tempfile.mkdtemp(prefix="s2lpo-slurm-")))
    cluster.root.rmdir()  # start() creates it and refuses a non-empty one
    cluster.start()
    up = time.monotonic()
    print(f"\nslurm tier: install {installed - start:.1f} s, cluster up in {up - installed:.1f} s")
    previous = _stop_on_sigterm()
    try:
        yield cluster
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        problems = cluster.stop()
        leftovers = sorted(_tmp_leftovers() - before)
        print(f"slurm tier: cluster stopped {'cleanly' if not problems else 'with problems'}")
        assert not problems, problems
        assert not leftovers, f"files a job left in {tempfile.gettempdir()}: {leftovers}"
        assert not cluster.root.exists(), f"{cluster.root} was not removed"


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _stop_on_sigterm():
    """A tier ended by SIGTERM (`timeout`, a CI job cancelled) still stops its cluster: the signal
    interrupts pytest as Ctrl-C does, which tears the fixtures down (the default action would
    leave the daemons running and the nodes in /etc/hosts). Returns the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _interrupt)
