"""Distributed tier: 2 gloo processes running real megatron-core on CPU.

Each test module launches ONE multi-process script (importing megatron costs ~6 s and every
launch ~7 s) that runs many checks and prints one `CHECK` record per check; the module's tests
then assert the records one by one. See launch.py and scripts/.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from launch import parse_checks, run_distributed  # noqa: E402

SCRIPTS = HERE / "scripts"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "distributed: starts 2 gloo processes with real megatron-core (slow)")


def run_checks(script: str, timeout: float, nprocs: int = 2) -> dict[str, dict]:
    """Run scripts/<script> on `nprocs` ranks; the CHECK records of all ranks (a failure on any rank wins)."""
    outputs = run_distributed(SCRIPTS / script, nprocs=nprocs, timeout=timeout)
    checks: dict[str, dict] = {}
    for output in outputs:
        for name, record in parse_checks(output).items():
            if name not in checks or not record["ok"]:
                checks[name] = record
    return checks


def assert_check(checks: dict[str, dict], name: str) -> None:
    assert name in checks, f"check {name!r} did not report (reported: {sorted(checks)})"
    record = checks[name]
    assert record["ok"], f"check {name} failed: " + "\n".join(f"{k}: {v}" for k, v in record.items())
