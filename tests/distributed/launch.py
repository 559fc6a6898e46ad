"""Run a Python script under N gloo processes (torchrun-style env), with a timeout.

    from tests.distributed.launch import run_distributed, parse_checks
    outputs = run_distributed("tests/distributed/scripts/tp2_checks.py", nprocs=2, timeout=240)
    checks = parse_checks(outputs[0])  # {"name": {"ok": bool, ...}}

Each rank is a plain `python script.py` child with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT set, as torchrun would (without torchrun's agent, which costs a second per launch).
If any rank fails or the timeout passes, every rank is killed and `DistributedRunError` carries
the exit codes and the output of all ranks. Scripts must guard their body with
`if __name__ == "__main__":` (dist_checkpointing starts helper processes).

Scripts report results as lines `CHECK {"name": ..., "ok": ..., ...}` (see `report_check`), so
one launch can run many checks and pytest can assert each separately.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from megatron_s2lpo.utils.ports import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
CHECK_PREFIX = "CHECK "


class DistributedRunError(AssertionError):
    """A multi-process run failed or timed out; the message holds every rank's output."""


def _format_outputs(outputs: list[str], codes: list[int | None], tail: int = 12000) -> str:
    parts = []
    for rank, (text, code) in enumerate(zip(outputs, codes)):
        parts.append(f"----- rank {rank} (exit code {code}) -----\n{text[-tail:]}")
    return "\n".join(parts)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the rank and any helper it started
        except ProcessLookupError:
            pass
    proc.wait()


def run_distributed(
    script: str | os.PathLike,
    *,
    nprocs: int = 2,
    timeout: float = 300.0,
    args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> list[str]:
    """Run `script` on `nprocs` ranks; return each rank's combined stdout+stderr.

    Raises DistributedRunError (with all ranks' output) when a rank exits non-zero or the run
    exceeds `timeout` seconds.
    """
    script = Path(script)
    if not script.is_file():
        raise FileNotFoundError(f"no script at {script}")
    port = free_port()
    base_env = {**os.environ, **(env or {})}
    base_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), base_env.get("PYTHONPATH")]))
    base_env.setdefault("OMP_NUM_THREADS", "1")  # ranks share the cores; oversubscription is slow
    logs = [tempfile.TemporaryFile(mode="w+") for _ in range(nprocs)]
    procs = []
    for rank in range(nprocs):
        rank_env = {**base_env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nprocs),
                    "LOCAL_WORLD_SIZE": str(nprocs), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, str(script), *args], env=rank_env, cwd=REPO_ROOT,
                                      stdout=logs[rank], stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + timeout
    timed_out = failed = False
    while any(p.poll() is None for p in procs):
        if time.monotonic() > deadline:
            timed_out = True
            break
        if any(p.poll() not in (None, 0) for p in procs):
            failed = True  # a dead rank leaves the others blocked in a collective
            time.sleep(2.0)  # let the survivors print their own error first
            break
        time.sleep(0.05)
    for proc in procs:
        _kill(proc)
    codes = [p.returncode for p in procs]
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    if timed_out:
        raise DistributedRunError(f"{script.name} timed out after {timeout:.0f} s\n"
                                  + _format_outputs(outputs, codes))
    if failed or any(code != 0 for code in codes):
        raise DistributedRunError(f"{script.name} failed\n" + _format_outputs(outputs, codes))
    return outputs


def report_check(name: str, ok: bool, **details: object) -> None:
    """Print one check result in the format `parse_checks` reads (call from inside a script)."""
    print(CHECK_PREFIX + json.dumps({"name": name, "ok": bool(ok), **details}, default=float), flush=True)


def parse_checks(output: str) -> dict[str, dict]:
    """The `CHECK` records of one rank's output, by name."""
    checks = {}
    for line in output.splitlines():
        if line.startswith(CHECK_PREFIX):
            record = json.loads(line[len(CHECK_PREFIX):])
            checks[record["name"]] = record
    return checks
