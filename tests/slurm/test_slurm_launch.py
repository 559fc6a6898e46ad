"""The cluster launch on a real Slurm (three emulated nodes, no containers), submitted by NeMo-Run,
with the tiny CPU recipe's in-process engines.

The chained run's stop request is the one Slurm sends ahead of the time limit, SIGUSR1 to the
batch shell, sent at once with `scancel --signal=USR1 --batch` (jobs.signal_batch_shell) instead
of waiting for Slurm's controller, which looks at time limits every 30 s; the torchrun run, in
the background, waits for the controller's own walltime signal.

Jobs run side by side where the three nodes allow (every job is --exclusive): the two-node
torchrun run trains beside the one-node chained run, and the resubmission of the finished run
beside the end of the torchrun run. Most of a job's time on 2 cores is its start (imports, the
step launch), which overlaps.
"""

from __future__ import annotations

import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from megatron_s2lpo.trainer.metrics import read_metrics
from megatron_s2lpo.utils.ports import free_port
from tests.integration.process_control import without_timing
from tests.slurm.jobs import (PYTHON, REPO, SMALL_BATCH, TINY, TINY_OVERRIDES, VENV, ResumeWatch, checkpoint_step,
                              launch, near_walltime, sbatch_log, signal_batch_shell, slurm_time, steps, stop_to_end_s,
                              stopped_step, task_logs, wait_job, wait_no_processes, wait_steps)

pytestmark = [pytest.mark.slow]

# ------------------------------------------------------------------ stop, cancel, chained resume

NUM_STEPS = 20


@pytest.fixture(scope="module")
def beside():
    """Runs a job scenario in a thread while the test's own jobs run (bounded by its own waits)."""
    pool = ThreadPoolExecutor(max_workers=1)
    yield pool
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def torchrun_run(slurm_cluster, tmp_path_factory, beside):
    """The two-node torchrun scenario, started at once in the background; its test waits for it."""
    return beside.submit(two_nodes_under_torchrun, slurm_cluster, tmp_path_factory.mktemp("torchrun"))


@pytest.fixture(scope="module")
def chained_run(slurm_cluster, tmp_path_factory, torchrun_run):
    """The tiny run as three chained jobs, each ended another way: the first is asked to stop as
    Slurm asks ahead of the time limit, the second is cancelled mid-run (`scancel`: SIGTERM to
    every task), the third resumes the run to its end. The same run trains uninterrupted beside
    them, outside Slurm."""
    tmp = tmp_path_factory.mktemp("chained")
    out, ref = tmp / "run", tmp / "reference"
    overrides = [*TINY_OVERRIDES, f"run.num_steps={NUM_STEPS}"]
    reference = subprocess.Popen([PYTHON, "-m", "megatron_s2lpo.cli", "train", TINY, *overrides,
                                  f"run.output_dir={ref}"], cwd=REPO, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
    try:
        ids = launch(slurm_cluster, tmp, "--time", "00:10:00", "--signal-lead", "120", "--max-chained-jobs", "2",
                     overrides=[*overrides, f"run.output_dir={out}"])
        assert len(ids) == 3
        wait_steps(slurm_cluster, ids[0], out, 3, timeout_s=400)
        signal_batch_shell(slurm_cluster, ids[0])
        first = wait_job(slurm_cluster, ids[0], 300)
        stopped = steps(out)
        resume = ResumeWatch(out, len(stopped))
        wait_steps(slurm_cluster, ids[1], out, len(stopped) + 2, on_poll=resume)
        assert slurm_cluster.run("scancel", ids[1]).returncode == 0
        second = wait_job(slurm_cluster, ids[1], 180)
        cancelled, cancelled_checkpoint = steps(out), checkpoint_step(out)  # before the third job trains
        second_left = wait_no_processes(ids[1])
        third = wait_job(slurm_cluster, ids[2], 500)
        _, err = reference.communicate(timeout=500)
        assert reference.returncode == 0, err[-3000:]
        # the finished run submitted again (test_resubmitting_a_finished_run_does_nothing)
        finished = (out / "metrics.jsonl").read_text()
        resubmitted = launch(slurm_cluster, tmp, "--time", "00:05:00", overrides=[*overrides, f"run.output_dir={out}"])
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()
    figures = {"stop_to_end_s": stop_to_end_s(first), "resume_s": resume.seconds_after(first)}
    print(f"\nslurm tier: stop request -> job end {figures['stop_to_end_s']:.0f} s; job end -> the chained "
          f"job's first resumed step {figures['resume_s']:.0f} s")
    return dict(tmp=tmp, out=out, ref=ref, ids=ids, first=first, second=second, third=third, stopped=stopped,
                cancelled=cancelled, cancelled_checkpoint=cancelled_checkpoint, second_left=second_left,
                finished=finished, resubmitted=resubmitted[0], figures=figures)


@pytest.mark.timeout(900)
def test_the_stop_request_checkpoints_and_the_chained_job_resumes(chained_run):
    first, stopped = chained_run["first"], chained_run["stopped"]
    log = sbatch_log(first)
    # the batch shell passed the request on; the trainer stopped mid-run after a checkpointed step
    assert "time limit near: asking the trainer to checkpoint and stop" in log
    assert 3 <= len(stopped) < NUM_STEPS and stopped_step(first, "SIGUSR1") == stopped[-1]
    # ... and the job ended by itself, as done (a chained job continues), within seconds
    assert (first["JobState"], first["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert chained_run["figures"]["stop_to_end_s"] < 60, chained_run["figures"]
    # the chained job (afterany) resumed from that checkpoint
    second = chained_run["second"]
    assert slurm_time_order(first, second)
    assert chained_run["cancelled"][:len(stopped)] == stopped and len(chained_run["cancelled"]) > len(stopped)


@pytest.mark.timeout(900)
def test_scancel_checkpoints_the_step_in_flight_and_leaves_no_process(chained_run):
    second, cancelled = chained_run["second"], chained_run["cancelled"]
    assert second["JobState"] == "CANCELLED", sbatch_log(second)[-3000:]
    # SIGTERM reached the trainer, which finished its step and checkpointed it (no periodic
    # checkpoint could have: run.save_every is 1000)
    assert "SIGTERM: finishing the current step" in task_logs(second)
    assert stopped_step(second, "SIGTERM") == cancelled[-1] == chained_run["cancelled_checkpoint"]
    assert not chained_run["second_left"]


@pytest.mark.timeout(900)
def test_the_last_chained_job_finishes_the_run_as_if_uninterrupted(chained_run):
    third, out = chained_run["third"], chained_run["out"]
    assert (third["JobState"], third["ExitCode"]) == ("COMPLETED", "0:0"), sbatch_log(third)[-3000:]
    assert steps(out) == list(range(1, NUM_STEPS + 1)) and checkpoint_step(out) == NUM_STEPS
    # exactly as the uninterrupted run (timings aside), across a stop request and a cancel
    resumed = [without_timing(r) for r in read_metrics(str(out / "metrics.jsonl"))]
    reference = [without_timing(r) for r in read_metrics(str(chained_run["ref"] / "metrics.jsonl"))]
    assert resumed == reference


@pytest.mark.timeout(300)
def test_resubmitting_a_finished_run_does_nothing(slurm_cluster, chained_run):
    info = wait_job(slurm_cluster, chained_run["resubmitted"], 240)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), sbatch_log(info)[-3000:]
    assert "the run finished already" in task_logs(info)
    assert (chained_run["out"] / "metrics.jsonl").read_text() == chained_run["finished"]


def slurm_time_order(first: dict[str, str], second: dict[str, str]) -> bool:
    """The second job waited for the first (its dependency is met and gone) and started after it ended."""
    return second["Dependency"] == "(null)" and slurm_time(second["StartTime"]) >= slurm_time(first["EndTime"])


# ------------------------------------------------------------------ two nodes under torchrun

TORCHRUN_STEPS = 1000  # more than either job trains: both are stopped
WALLTIME_LEAD_S = 240


def two_nodes_under_torchrun(cluster, tmp) -> dict:
    """Two nodes, one torchrun rank each: stopped by Slurm's own walltime signal after two steps
    (the job's `--signal=B:USR1@240`, sent by the controller once the test shortens the job's
    limit: at most 30 s later, in the background of the chained run); the chained job resumes
    and is asked to stop two steps later."""
    out = tmp / "run"
    overrides = [*TINY_OVERRIDES, *SMALL_BATCH, f"run.num_steps={TORCHRUN_STEPS}", f"run.output_dir={out}"]
    ids = launch(cluster, tmp, "--nodes", "2", "--torchrun-port", str(free_port()), "--time", "00:10:00",
                 "--signal-lead", str(WALLTIME_LEAD_S), "--max-chained-jobs", "1", overrides=overrides)
    wait_steps(cluster, ids[0], out, 2, timeout_s=400)
    near_walltime(cluster, ids[0], WALLTIME_LEAD_S)
    first = wait_job(cluster, ids[0], 300)
    stopped, checkpointed = steps(out), checkpoint_step(out)  # before the chained job trains
    wait_steps(cluster, ids[1], out, len(stopped) + 2, timeout_s=400)
    signal_batch_shell(cluster, ids[1])
    second = wait_job(cluster, ids[1], 300)
    return dict(out=out, first=first, second=second, stopped=stopped, checkpointed=checkpointed)


@pytest.mark.timeout(900)
def test_two_nodes_under_torchrun_both_stop_on_the_walltime_signal_and_resume(torchrun_run):
    run = torchrun_run.result(timeout=850)
    first, stopped, out = run["first"], run["stopped"], run["out"]
    assert first["NumNodes"] == "2" and re.fullmatch(r"s2lpo-n\[\d[-,]\d\]", first["NodeList"]), first
    logs = task_logs(first)
    assert (first["JobState"], first["ExitCode"]) == ("COMPLETED", "0:0"), sbatch_log(first)[-3000:] + logs[-3000:]
    assert "time limit near: asking the trainer to checkpoint and stop" in sbatch_log(first)
    assert 0 < len(stopped) < TORCHRUN_STEPS
    # both ranks (one per node) took the request; they agreed on the step, which is checkpointed
    assert logs.count("SIGUSR1: finishing the current step") == 2, logs[-3000:]
    assert run["checkpointed"] == stopped[-1]
    # the chained job resumed after that step, on both ranks, and stopped checkpointed again
    second, done = run["second"], steps(out)
    assert (second["JobState"], second["ExitCode"]) == ("COMPLETED", "0:0"), sbatch_log(second)[-3000:]
    assert task_logs(second).count("SIGUSR1: finishing the current step") == 2, task_logs(second)[-3000:]
    assert done == list(range(1, len(done) + 1)) and len(done) >= len(stopped) + 2 and checkpoint_step(out) == done[-1]
    print(f"\nslurm tier: 2 nodes x torchrun: Slurm's walltime signal -> job end {stop_to_end_s(first):.0f} s")


# ------------------------------------------------------------------ jobs that fail

@pytest.fixture(scope="module")
def failed_jobs(slurm_cluster, tmp_path_factory):
    """Two failing jobs at once (one node and two nodes of the three): a usage error with retries
    allowed, and an explorer server (a heterogeneous job's own node) that exits at once because its
    interpreter has no SGLang."""
    tmp = tmp_path_factory.mktemp("failed")
    (tmp / "usage").mkdir()
    (tmp / "server").mkdir()
    usage = launch(slurm_cluster, tmp / "usage", "--time", "00:05:00", "--retries", "2",
                   overrides=[*TINY_OVERRIDES, "run.num_steps=4", f"data.train_path={tmp / 'no-such-data.jsonl'}",
                              f"run.output_dir={tmp / 'usage' / 'run'}"])[0]
    server = launch(slurm_cluster, tmp / "server", "--nodes", "2", "--time", "00:05:00", "--retries", "1",
                    "--sglang-python", PYTHON,
                    overrides=[*TINY_OVERRIDES, "run.num_steps=4", "rollout.explorer.backend=sglang",
                               f"rollout.explorer.model_path={tmp}", "rollout.explorer.init_arch=null",
                               f"run.output_dir={tmp / 'server' / 'run'}"])[0]
    return {"usage": (usage, wait_job(slurm_cluster, usage, 300)),
            "server": (server, wait_job(slurm_cluster, server, 400))}


@pytest.mark.timeout(600)
def test_a_usage_error_fails_the_job_once_even_with_retries(failed_jobs):
    job_id, info = failed_jobs["usage"]
    log = sbatch_log(info)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "2:0", "0"), log[-3000:]
    assert "status 2 is a usage or configuration error: not requeued" in log
    assert "s2lpo train: error:" in log  # the trainer's own error, quoted from its log in the job's output
    assert not wait_no_processes(job_id)


@pytest.mark.timeout(600)
def test_a_server_that_dies_ends_the_job_with_its_error_and_no_stray_process(failed_jobs):
    """The trainer, waiting for the explorer's server, is stopped; the job fails naming the server."""
    job_id, info = failed_jobs["server"]
    log = sbatch_log(info)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "1:0", log[-3000:]
    assert "task 1 (explorer_server) ended first, with status 1" in log
    assert "No module named 'sglang'" in log
    # a server failure may pass on another try: requeued once, then given up
    # (the log also holds the script's text, once per start, and its `set -x` trace)
    assert info["Restarts"] == "1" and len(re.findall(r"^s2lpo: requeueing the job", log, re.M)) == 1, log[-3000:]
    assert not wait_no_processes(job_id, str(int(job_id) + 1))


# ------------------------------------------------------------------ the preflight

def check(cluster, tmp_path, *args: str, overrides: list[str] = ()) -> tuple[int, str]:
    command = [PYTHON, str(REPO / "examples" / "launch.py"), "--recipe", TINY, "--executor", "slurm", "--nodes", "1",
               "--account", "s2lpo", "--partition", "batch", "--gpus-per-node", "0", "--check", *args,
               f"run.output_dir={tmp_path / 'run'}", *overrides]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, **cluster.env}, stdin=subprocess.DEVNULL)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.timeout(300)
def test_check_reports_what_the_launch_needs_from_this_site(slurm_cluster, tmp_path):
    rc, out = check(slurm_cluster, tmp_path, "--venv", VENV, "--step-time", "0.5", overrides=["run.save_every=5"])
    assert rc == 0, out
    lines = out.splitlines()
    assert any(re.match(r"ok +sinfo: slurm-wlm 22\.05", x) for x in lines), out
    assert any(re.match(r"ok +partition: batch is up, 3 nodes", x) for x in lines), out
    assert any(re.match(r"ok +time limit: partition 20:00", x) for x in lines), out
    assert any(re.match(r"ok +pyxis: absent", x) for x in lines), out
    assert any(re.match(r"ok +gpus: 8 per node \(gres gpu:8\)", x) for x in lines), out
    assert any(re.match(rf"(ok|warn) +environment: {re.escape(VENV)}/bin/python: megatron-core 0\.16\.1", x)
               for x in lines), out
    # what this site cannot give, each with its fix
    rc, out = check(slurm_cluster, tmp_path, "--container-image", "registry.example.com/s2lpo:0.1.0",
                    "--gpus-per-node", "16", "--time", "00:30:00",
                    overrides=[f"data.train_path={tmp_path / 'missing.parquet'}"])
    assert rc == 1
    for expected in (r"FAIL pyxis: srun has no --container-image: this Slurm has no pyxis -> run without a "
                     r"container: drop --container-image and name the environment with --venv DIR",
                     r"FAIL gpus: the nodes have 8 GPU\(s\) each .* -> pass --gpus-per-node 8",
                     r"FAIL time limit: --time 00:30:00 is longer than the partition's 20:00 -> pass --time 20:00",
                     r"FAIL paths: data.train_path=\S+missing.parquet is under none of the --mounts"):
        assert re.search(expected, out), (expected, out)
    rc, out = check(slurm_cluster, tmp_path, "--venv", VENV, "--step-time", "4", overrides=["run.save_every=3"])
    assert rc == 1 and re.search(r"FAIL time limit: .*lower run.save_every to 1", out), out
