"""The run directory: one live run at a time, resumes that change the run's meaning, directories no
run can use, a full disk.

- Two runs into one directory: while a run is alive (paused here with SIGSTOP, so the test does
  not race it), a second run and a `--resume` are refused naming it; once it is SIGKILLed, the
  kernel has released its lock and `--resume` continues it exactly.
- `--resume` with group size, seed, learning rate, t_mix and the synthetic data changed is refused,
  listing each; `run.num_steps` below the checkpoint is an error; an accepted learning-rate change
  is recorded, printed and applied (the resumed steps' train/lr is twice the uninterrupted run's,
  the schedule being in its linear warmup), and pruning passes a step directory that is a symlink.
- A dangling or looping symlink as run.output_dir, or a file named `checkpoints`: a usage error.
- A full disk at resume (a tmpfs mount, where this machine allows one): a clear error, nothing in
  the run directory changed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from fault_runs import (NUM_STEPS, REPO_ROOT, RUN_TIMEOUT_S, command, copy_run, differences, metrics, step_dir,
                        train)

from megatron_s2lpo.trainer.metrics import read_metrics


def run_cli(run: Path, *extra: str, timeout_s: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(command(run, *extra), cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s)


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_a_second_run_or_resume_is_refused_while_one_lives_and_a_killed_one_leaves_no_lock(reference,
                                                                                           tmp_path: Path) -> None:
    run = copy_run(reference["sync"], tmp_path / "run", models_only=True)
    latest = run / "checkpoints" / "latest"
    first = subprocess.Popen(command(run), cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not latest.is_file():
            assert first.poll() is None and time.monotonic() < deadline, "the first run never checkpointed"
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGSTOP)  # alive, holding the directory, and not racing the test
        before = metrics(run)
        for extra in (("--resume",), ()):  # a resume first: the old code ran it over the live run
            proc = run_cli(run, *extra)
            assert proc.returncode == 2, proc.stderr[-3000:]
            assert f"is in use by a live run (pid {first.pid} on " in proc.stderr, proc.stderr[-3000:]
        assert metrics(run) == before  # the refused runs wrote nothing
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    train(run, "--resume")  # the kernel released the dead run's lock
    assert differences(metrics(reference["sync"]), metrics(run)) == []


def _cut_back(run: Path, step: int) -> None:
    """The run as a kill after `step`'s checkpoint leaves it (later checkpoints gone)."""
    for later in range(step + 1, NUM_STEPS + 1):
        shutil.rmtree(step_dir(run, later))
    (run / "checkpoints" / "latest").write_text(f"step_{step:08d}\n")


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_a_resume_that_changes_the_run_is_refused_unless_accepted(reference, tmp_path: Path) -> None:
    run = copy_run(reference["sync"], tmp_path / "run")
    _cut_back(run, 3)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = run_cli(run, "algo.group_size=8", "run.seed=7", "learner.optim.lr=0.002", "algo.t_mix=2",
                   "data.synthetic.seed=5", "--resume")
    assert proc.returncode == 2, proc.stderr[-3000:]
    for change in ("algo.group_size: 4 -> 8", "run.seed: 1234 -> 7", "learner.optim.lr: 0.001 -> 0.002",
                   "algo.t_mix: 4 -> 2", "data.synthetic.seed: 0 -> 5"):
        assert change in proc.stderr, proc.stderr[-3000:]
    assert "--allow-config-change" in proc.stderr
    proc = run_cli(run, "run.num_steps=2", "--resume")
    assert proc.returncode == 2 and "run.num_steps=2 is below the step of the checkpoint" in proc.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "run.lock"} == before
    # accepted: recorded, printed, applied; step 1's directory is a symlink that pruning leaves alone
    moved = tmp_path / "elsewhere" / "step_00000001"
    shutil.move(step_dir(run, 1), moved)
    step_dir(run, 1).symlink_to(moved)
    proc = train(run, "learner.optim.lr=0.002", "run.keep_checkpoints=1", "--resume", "--allow-config-change",
                 "learner.optim.lr")
    assert "config change accepted at resume from step_00000003: learner.optim.lr: 0.001 -> 0.002" in proc.stdout
    (record,) = [json.loads(line) for line in (run / "config_changes.jsonl").read_text().splitlines()]
    assert (record["setting"], record["old"], record["new"], record["resumed_from"]) == (
        "learner.optim.lr", 0.001, 0.002, "step_00000003")
    expected, got = metrics(reference["sync"]), metrics(run)
    assert [r["step"] for r in got] == list(range(1, NUM_STEPS + 1))
    for want, have in zip(expected[3:], got[3:]):
        assert have["train/lr"] == pytest.approx(2 * want["train/lr"], rel=1e-12), have["step"]
    assert step_dir(run, 1).is_symlink() and (moved / "COMPLETE").is_file()
    assert "not pruning checkpoint" in proc.stderr


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", ["dangling symlink", "symlink loop", "a file named checkpoints"])
def test_an_output_directory_no_run_can_use_is_a_usage_error(tmp_path: Path, case: str) -> None:
    out = tmp_path / "out"
    if case == "dangling symlink":
        out.symlink_to(tmp_path / "nowhere")
        expected = f"is a symlink to {tmp_path / 'nowhere'}, which does not exist"
    elif case == "symlink loop":
        out.symlink_to(tmp_path / "loop")
        (tmp_path / "loop").symlink_to(out)
        expected = "is a symlink loop"
    else:
        out.mkdir()
        (out / "checkpoints").write_text("not a directory")
        expected = f"{out / 'checkpoints'} is a file, not a directory"
    proc = run_cli(out, timeout_s=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 64 MiB tmpfs (root only; skipped where mounting is not allowed), unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip()}): the full-disk case needs one")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_a_full_disk_at_resume_is_a_clear_error_and_changes_nothing(reference, small_disk: Path) -> None:
    run = copy_run(reference["sync"], small_disk / "run")
    _cut_back(run, 3)
    fd = os.open(small_disk / "filler", os.O_WRONLY | os.O_CREAT)  # every free block taken
    for size in (1 << 20, 4096, 1):
        try:
            while os.write(fd, b"\0" * size):
                pass
        except OSError:
            pass
    os.close(fd)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = run_cli(run, "--resume")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "no space left on device" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "run.lock"}
    assert after == {p: b for p, b in before.items() if p.name != "run.lock"}
    assert [r["step"] for r in read_metrics(str(run / "metrics.jsonl"))] == list(range(1, NUM_STEPS + 1))


def test_a_dataset_changed_in_place_is_a_config_change(tmp_path: Path) -> None:
    """The same data.train_path with other contents: refused at resume unless `data` is accepted."""
    from megatron_s2lpo.config import load_config
    from megatron_s2lpo.trainer.config_changes import CONFIG_KEY, check_resume_config, snapshot

    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    overrides = [f"data.train_path={data}", "rollout.learner.model_path=/m", "algo.t_mix=0",
                 "data.prompts_per_step=1"]
    cfg = load_config(None, overrides)
    state = {"step": 3, CONFIG_KEY: snapshot(cfg)}
    assert check_resume_config(cfg, tmp_path / "step_00000003", state) == []
    data.write_text('{"prompt": "1+1=", "answer": "3"}\n')
    os.utime(data, ns=(time.time_ns(), data.stat().st_mtime_ns + 10**9))  # a new mtime even on a coarse clock
    with pytest.raises(ValueError, match=r"(?s)data.train_path \(contents\): \"[0-9a-f]{64}\" -> \"[0-9a-f]{64}\".*"
                                         r"--allow-config-change data.train_path"):
        check_resume_config(cfg, tmp_path / "step_00000003", state)
    accepting = load_config(None, overrides + ["run.allow_config_change=[data]"])
    (change,) = check_resume_config(accepting, tmp_path / "step_00000003", state)
    assert change[0] == "data.train_path (contents)"
