"""`make demo` runs examples/demo.py; a shortened run keeps it from rotting."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.timeout(300)
def test_demo_short_run_prints_both_runs():
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "examples", "demo.py"), "--steps", "4", "--t-mix", "3"],
        capture_output=True, text=True, timeout=280, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    table = [line.split() for line in lines if line.strip()[:1].isdigit()]
    assert [row[0] for row in table] == ["1", "2", "3", "4"]
    assert [row[2] for row in table] == ["8/0", "4/4", "0/8", "0/8"]  # split_group(i, 8, 3)
    assert any(line.startswith("final held-out accuracy: S2L-PO") for line in lines)
    assert "0 timeouts" in proc.stdout
