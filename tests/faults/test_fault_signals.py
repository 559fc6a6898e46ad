"""Stop signals to the trainer's whole process group, kills, and peers that hang.

SIGTERM and SIGUSR1 reach every process of the group (a shell's Ctrl-C, `scancel`, a preempting
scheduler): the trainer finishes the step, checkpoints it, exits 75, and the resumed run logs
exactly what the uninterrupted one did; the reward workers ignore the signal (were they killed,
the step would score completions 0.0 and the resumed run would differ). SIGKILL of the group is
resumed exactly too, at staleness 0 and 1 (the random-kill soak tries more points).

A peer that never answers: a launched SGLang-protocol stand-in (tests/protocol_server.py, which
follows SGLang 0.5.23's HTTP API; `--delay-s` makes every generation sleep, a hang a real server
cannot be made to do on demand). With a finite rollout.learner.hang_timeout_s the run ends with
an error naming the server; with an effectively infinite one the step never finishes, the first
SIGTERM cannot stop it at a step boundary, and the second stops it at once (exit 143).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from fault_runs import AHEAD, REPO_ROOT, RUN_TIMEOUT_S, command, copy_run, differences, metrics, train
from process_control import group_members, kill_after_checkpoint, signal_after_lines

from megatron_s2lpo.trainer.stop_signal import CONTINUE_EXIT_CODE
from megatron_s2lpo.utils.ports import free_port


def stop_with(run: Path, sig: int, after_lines: int, *extra: str) -> str:
    """Signal the run's whole process group while the step after `after_lines` runs; it must stop
    at that step's end with the "continue" status, the step checkpointed."""
    status, log = signal_after_lines(command(run, "run.save_every=0", *extra), REPO_ROOT, run / "metrics.jsonl",
                                     num_lines=after_lines, sig=sig, timeout_s=RUN_TIMEOUT_S, group=True)
    name = signal.Signals(sig).name
    assert status == CONTINUE_EXIT_CODE, log[-4000:]
    assert f"stopped on {name} after step {after_lines + 1}" in log
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{after_lines + 1:08d}"
    assert "killed two workers" not in log and "reward 0.0" not in log
    return log


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_group_sigterm_then_group_sigusr1_resume_exactly(reference, tmp_path: Path) -> None:
    run = copy_run(reference["sync"], tmp_path / "run", models_only=True)
    stop_with(run, signal.SIGTERM, 1)
    stop_with(run, signal.SIGUSR1, 3, "--resume")
    train(run, "--resume")
    assert differences(metrics(reference["sync"]), metrics(run)) == []


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_one_step_ahead_group_sigterm_then_group_sigkill_resume_exactly(reference, tmp_path: Path) -> None:
    from megatron_s2lpo.trainer.pipeline import PENDING_FILE

    run = copy_run(reference["ahead"], tmp_path / "run", models_only=True)
    stop_with(run, signal.SIGTERM, 2, *AHEAD)
    assert (run / "checkpoints" / "step_00000003" / PENDING_FILE).is_file()  # step 4's rollouts, made during 3
    latest = run / "checkpoints" / "latest"
    kill_after_checkpoint(command(run, *AHEAD, "--resume"), REPO_ROOT, latest, what="its next checkpoint",
                          timeout_s=RUN_TIMEOUT_S, after="step_00000003")
    train(run, *AHEAD, "--resume")
    assert differences(metrics(reference["ahead"]), metrics(run)) == []


SCORER_SCRIPT = textwrap.dedent("""
    import json, signal, sys
    from megatron_s2lpo.reward.math import MathScorer

    received = []
    signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))  # as the trainer records it
    with MathScorer(num_workers=2, timeout_s=60, num_spare_workers=1) as scorer:
        pids = scorer.worker_pids(include_spares=True)
        print("ready", flush=True)
        rewards = []
        for _ in range(int(sys.argv[1])):
            rewards += scorer.score([r"so \\boxed{%d}" % i for i in range(40)], [str(i) for i in range(40)])
        stats = scorer.stats()
        print(json.dumps({"rewards": rewards, "received": len(received), "pids": pids,
                          "pids_after": scorer.worker_pids(include_spares=True),
                          "errors": stats.num_errors, "restarts": stats.num_worker_restarts}), flush=True)
        sys.stdin.read()  # the test stops signalling, then closes stdin (no signal during interpreter exit)
""")


@pytest.mark.timeout(300)
def test_reward_workers_outlive_sigterms_to_the_whole_group(tmp_path: Path) -> None:
    """SIGTERM to the group every 50 ms while 200 completions are scored: every completion is
    scored (all are correct: reward 1.0), no worker dies or is replaced."""
    script = tmp_path / "score.py"
    script.write_text(SCORER_SCRIPT)
    out_path, err_path = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out_path, "w") as out_file, open(err_path, "w") as err_file:
        proc = subprocess.Popen([sys.executable, str(script), "5"], cwd=REPO_ROOT, stdin=subprocess.PIPE,
                                stdout=out_file, stderr=err_file, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and "ready" not in out_path.read_text():
            assert time.monotonic() < deadline, "the scorer never got ready"
            time.sleep(0.05)
        while proc.poll() is None and not out_path.read_text().strip().endswith("}"):
            os.killpg(proc.pid, signal.SIGTERM)
            time.sleep(0.05)
        proc.stdin.close()
        proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    lines = out_path.read_text().strip().splitlines()
    assert proc.returncode == 0 and lines[-1:] != ["ready"], f"the scoring process failed:\n{err_path.read_text()[-3000:]}"
    out = json.loads(lines[-1])
    assert out["received"] > 0
    assert out["rewards"] == [1.0] * 200, f"{out['rewards'].count(0.0)} completions scored 0.0"
    assert (out["errors"], out["restarts"], out["pids_after"]) == (0, 0, out["pids"])


def _server_state(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_test/state", timeout=5) as resp:
            return json.loads(resp.read())
    except OSError:
        return None


def hung_server_run(run: Path, port: int, hang_timeout_s: float) -> list[str]:
    """The command of a run whose learner is a launched stand-in server that sleeps 1000 s in every
    generation (a hang), the trainer giving up on a request after `hang_timeout_s`."""
    return command(run, "run.num_steps=2", "algo.t_mix=0", "rollout.learner.backend=sglang",
                   f"rollout.learner.port={port}", "rollout.learner.startup_timeout_s=200",
                   f"rollout.learner.launch_command=[{sys.executable}, tests/protocol_server.py, --delay-s, '1000']",
                   f"rollout.learner.hang_timeout_s={hang_timeout_s}", "rollout.learner.max_retries=1")


def _wait_for_generation(proc: subprocess.Popen, port: int, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before its first generation"
        state = _server_state(port)
        if state is not None and state.get("inflight"):
            return state
        time.sleep(0.2)
    raise AssertionError(f"no generation in flight on port {port} within {timeout_s:.0f} s")


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_a_hung_server_ends_the_run_with_a_bounded_error(reference, tmp_path: Path) -> None:
    run = copy_run(reference["sync"], tmp_path / "run", models_only=True)
    port = free_port()
    proc = subprocess.run(hung_server_run(run, port, 3), cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S + 120)
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert f"http://127.0.0.1:{port}/generate" in proc.stderr and "no answer within 3 s" in proc.stderr
    assert "--resume" in proc.stderr and "Traceback" not in proc.stderr
    assert _server_state(port) is None  # the launched server was stopped with the run


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_a_second_sigterm_stops_a_trainer_stuck_on_a_hung_server(reference, tmp_path: Path) -> None:
    run = copy_run(reference["sync"], tmp_path / "run", models_only=True)
    port = free_port()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(hung_server_run(run, port, 10**6), cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            server = _wait_for_generation(proc, port, RUN_TIMEOUT_S)
            os.killpg(proc.pid, signal.SIGTERM)
            time.sleep(5)  # more than REPEAT_AFTER_S: the next one is a second request
            assert proc.poll() is None, "the step cannot finish: the first SIGTERM must not end the run"
            os.killpg(proc.pid, signal.SIGTERM)
            status = proc.wait(90)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.seek(0)
        output = log.read()
    assert status == 128 + signal.SIGTERM, output[-4000:]
    assert "SIGTERM: finishing the current step" in output and "SIGTERM again: stopping now" in output
    assert "stopped at once on a repeated SIGTERM" in output
    deadline = time.monotonic() + 30
    while (_server_state(port) is not None or group_members(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _server_state(port) is None, f"the server {server['pid']} outlived the stopped run"
    assert not group_members(proc.pid)
    assert metrics(run) == []  # nothing was trained, nothing half-logged
