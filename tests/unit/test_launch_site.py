"""What a Slurm site without pyxis, with --export=NONE, with short smoke-test jobs or without
accounting needs from the launch: rendered by NeMo-Run's dry run, and the batch script's own
lines run by bash. (The same launches run on a real Slurm in tests/slurm.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("nemo_run", reason="nemo-run is not installed (pip install -e .)")

from megatron_s2lpo.config import load_config  # noqa: E402
from megatron_s2lpo.launch.experiment import SlurmOptions, build_slurm_experiment, render_slurm  # noqa: E402
from megatron_s2lpo.launch.plan import ClusterLayout, local_host, plan_launch  # noqa: E402
from megatron_s2lpo.launch.walltime import LaunchWarning  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "examples", "tiny_cpu.yaml")
RECIPE_8B = os.path.join(REPO, "examples", "qwen3_8b_explorer_1p7b.yaml")
VENV = "/shared/envs/s2lpo"


@pytest.fixture(autouse=True)
def _stdin_devnull(monkeypatch):
    with open(os.devnull) as devnull:  # NeMo-Run's packaging runs `mkdir` through invoke, which reads stdin
        monkeypatch.setattr(sys, "stdin", devnull)
        yield


def _render(tmp_path, recipe=TINY, overrides=(), layout=None, **opts):
    cfg = load_config(recipe, [f"run.output_dir={tmp_path / 'run'}", *overrides])
    layout = ClusterLayout(**{"num_nodes": 1, "gpus_per_node": 0, "python": f"{VENV}/bin/python",
                              "activate": f"source {VENV}/bin/activate", **(layout or {})})
    options = SlurmOptions(**{"account": "a", "partition": "p", "time": "01:00:00", "job_dir": str(tmp_path / "jobs"),
                              **opts})
    exp, plan = build_slurm_experiment(cfg, recipe, layout, options, base_dir=str(tmp_path / "home"))
    return render_slurm(exp), plan


def test_without_an_image_the_job_runs_in_the_named_environment_and_no_pyxis_option_is_written(tmp_path):
    rendered, _ = _render(tmp_path, layout={"num_nodes": 2})
    srun = next(line for line in rendered.sbatch.splitlines() if line.startswith("srun ") and "scripts/" in line)
    assert "--container" not in rendered.sbatch  # a Slurm without pyxis refuses its options
    assert "--chdir" in srun
    trainer = next(iter(rendered.scripts.values()))
    lines = trainer.splitlines()
    assert f"source {VENV}/bin/activate" in lines[:5]  # recorded in the script, first
    run_line = next(x for x in lines if " megatron_s2lpo.cli train " in x)
    # the interpreter by path: nothing depends on the node's PATH (--export=NONE sites)
    assert run_line.startswith(f"{VENV}/bin/python -m torch.distributed.run --nnodes 2 --nproc-per-node 1 ")
    assert not re.search(r"(^|\s)(torchrun|python)\s", trainer.replace(f"{VENV}/bin/python", "PY"))


def test_without_an_image_an_environment_must_be_named(tmp_path):
    with pytest.raises(ValueError, match="--venv DIR .* or --python PATH"):
        _render(tmp_path, layout={"python": "python", "activate": ""})
    with pytest.raises(ValueError, match="without --container-image"):
        SlurmOptions(account="a", partition="p", time="1:00:00", container_mounts=["/a:/b"])
    with pytest.raises(ValueError, match=r"relative path.*run.output_dir=\$PWD/runs/tiny_cpu"):
        cfg = load_config(TINY)
        build_slurm_experiment(cfg, TINY, ClusterLayout(num_nodes=1, gpus_per_node=0, python="/p/bin/python"),
                               SlurmOptions(account="a", partition="p", time="1:00:00"))


def test_the_monitor_loop_looks_every_few_seconds(tmp_path):
    """NeMo-Run's default (60 s) delayed the stop trap and the job's end by minutes."""
    rendered, _ = _render(tmp_path)
    loop = rendered.sbatch[rendered.sbatch.index("all_done=false"):]
    assert re.findall(r"sleep (\d+)", loop) == ["2", "2"]


def test_a_smoke_test_job_is_not_refused_for_the_ten_minute_start_allowance(tmp_path):
    """A 6-minute job of 30-second steps: refused before (it assumed 10 min to start any job)."""
    with pytest.warns(LaunchWarning, match="leaves less than a step"):
        rendered, _ = _render(tmp_path, overrides=["run.save_every=2", "run.num_steps=4"], time="00:06:00", step_time_s=30)
    assert "#SBATCH --time=00:06:00" in rendered.sbatch
    with pytest.raises(ValueError, match="--startup-time"):  # a stated start that does not fit is still refused
        _render(tmp_path, overrides=["run.save_every=2", "run.num_steps=4"], time="00:06:00", step_time_s=30, startup_s=300)


@pytest.mark.parametrize("status, restarts, requeued", [
    (2, 0, False),  # a usage or configuration error: the same job would meet it again
    (1, 0, True),  # a crash may pass on another try
    (137, 1, True),
    (1, 2, False),  # --retries 2 spent
    (0, 0, False),
])
def test_the_job_end_trap_requeues_only_failures_that_may_pass(tmp_path, status, restarts, requeued):
    from megatron_s2lpo.launch.sbatch import job_end_trap

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$*" >> {tmp_path}/scontrol.log\n'
                                      f'[ "$1 $2" = "show job" ] && echo "   StdOut={tmp_path}/sbatch_x_7.out"\n'
                                      "exit 0\n")
    (bin_dir / "scontrol").chmod(0o755)
    (tmp_path / "log-x-1_7_0.out").write_text("Traceback ...\nValueError: data.train_path=/nope: no such file\n")
    script = (f"{job_end_trap(['trainer', 'explorer_server'], max_retries=2)}\n"
              "sleep 0 & pids[0]=$!\nsleep 0 & pids[1]=$!\nwait\n"
              f"pid=${{pids[1]}}\nexit {status}\n")
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30,
                          env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "7",
                               "SLURM_RESTART_COUNT": str(restarts)})
    assert proc.returncode == status
    calls = (tmp_path / "scontrol.log").read_text() if (tmp_path / "scontrol.log").exists() else ""
    assert ("requeue 7" in calls) == requeued
    if status:
        assert "task 1 (explorer_server) ended first, with status" in proc.stderr
        assert "ValueError: data.train_path=/nope" in proc.stderr  # the end of that task's log
    assert ("not requeued" in proc.stderr) == (status == 2)


def _trainer_script(tmp_path, stub_body: str) -> tuple[str, dict]:
    stub = tmp_path / "python"
    stub.write_text("#!/bin/bash\n" + stub_body)
    stub.chmod(0o755)
    cfg = load_config(TINY, [f"run.output_dir={tmp_path / 'run'}"])
    plan = plan_launch(cfg, TINY, ClusterLayout(num_nodes=1, gpus_per_node=0, python=str(stub)), host=local_host)
    env = {"PATH": os.environ["PATH"], "TMPDIR": str(tmp_path / "tmp"), "SLURM_JOB_ID": "9", "SLURM_NODEID": "1"}
    (tmp_path / "tmp").mkdir()
    (tmp_path / "job").mkdir()  # the task's working directory: NeMo-Run's job directory
    return plan.trainer_script, env


@pytest.mark.parametrize("in_slurm", [True, False])
def test_the_trainer_script_leaves_nothing_in_the_nodes_tmp(tmp_path, in_slurm):
    script, env = _trainer_script(tmp_path, f'[ "$2" = megatron_s2lpo.launch.run_state ] && exit 1\n'
                                            f'cp "$4" {tmp_path}/seen.yaml; exit 3\n')
    if not in_slurm:
        del env["SLURM_JOB_ID"]
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30, env=env,
                          cwd=tmp_path / "job")
    assert proc.returncode == 3
    assert "tiny_cpu" in (tmp_path / "seen.yaml").read_text()  # the trainer read the resolved config
    assert os.listdir(tmp_path / "tmp") == []  # nothing in $TMPDIR, the stop marker neither
    # a job keeps the config it ran with beside its scripts, one per node; one machine keeps nothing
    assert os.listdir(tmp_path / "job") == (["s2lpo-config-9-1.yaml"] if in_slurm else [])


def test_sigterm_before_the_trainer_starts_ends_the_script_without_starting_it(tmp_path):
    """scancel while the job checks its run state: nothing new starts (it used to start the trainer)."""
    script, env = _trainer_script(tmp_path, f'if [ "$2" = megatron_s2lpo.launch.run_state ]; then\n'
                                            f'  touch {tmp_path}/checking; sleep 5; exit 1\nfi\n'
                                            f'touch {tmp_path}/trainer-started\n')
    proc = subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True, cwd=tmp_path / "job")
    try:
        while not (tmp_path / "checking").exists():
            assert proc.poll() is None
        os.killpg(proc.pid, 15)  # slurmstepd signals every process of the step
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143 and "terminated before the trainer started" in err
    assert not (tmp_path / "trainer-started").exists()
    assert os.listdir(tmp_path / "tmp") == []


def test_a_cpu_profile_server_binds_its_threads_unless_the_site_does():
    """SGLang 0.5.23 on CPU reads SGLANG_CPU_OMP_THREADS_BIND at the replica's --base-gpu-id."""
    from megatron_s2lpo.launch.plan import server_script

    cfg = load_config(TINY, ["run.output_dir=/r", "rollout.explorer.backend=sglang", "rollout.explorer.profile=cpu",
                             "rollout.explorer.model_path=/m/explorer", "rollout.explorer.init_arch=null",
                             "rollout.explorer.base_gpu_id=1"])
    plan = plan_launch(cfg, TINY, ClusterLayout(num_nodes=2, gpus_per_node=0, python=f"{VENV}/bin/python"))
    script = server_script(plan.servers[0], plan.activate)
    # on a node of its own the server's devices start at 0 (below); device 0 keeps the recipe's core 1
    assert 'export SGLANG_CPU_OMP_THREADS_BIND="${SGLANG_CPU_OMP_THREADS_BIND:-1}"' in script.splitlines()
    assert "--base-gpu-id 0" in script
    assert "--device cpu" in script and f'"${{S2LPO_SGLANG_PYTHON:-{VENV}/bin/python}}"' in script
    # on one machine, beside the learner's server, it runs at --base-gpu-id 1: device 1 -> core 1
    local = plan_launch(cfg, TINY, ClusterLayout(num_nodes=1, gpus_per_node=0, python=f"{VENV}/bin/python"),
                        host=local_host, one_machine=True, embed_config=False)
    script = server_script(local.servers[0], local.activate)
    assert 'export SGLANG_CPU_OMP_THREADS_BIND="${SGLANG_CPU_OMP_THREADS_BIND:-0|1}"' in script.splitlines()
    assert "--base-gpu-id 1" in script


@pytest.mark.parametrize("replicas", [1, 8])
def test_a_server_on_a_node_of_its_own_starts_at_gpu_0(replicas):
    """A recipe's base_gpu_id places a server beside another on one machine; on a node of its own
    every GPU of the node is the server's (base_gpu_id 1 with 8 replicas would ask for GPU 8)."""
    cfg = load_config(TINY, ["run.output_dir=/r", "rollout.explorer.backend=sglang", "rollout.explorer.model_path=/m",
                             "rollout.explorer.init_arch=null", "rollout.explorer.profile=",
                             "rollout.explorer.base_gpu_id=1", f"rollout.explorer.replicas={replicas}"])
    plan = plan_launch(cfg, TINY, ClusterLayout(num_nodes=2, gpus_per_node=8, python=f"{VENV}/bin/python",
                                                allow_over_budget=True))
    gpu_ids = [int(c[c.index("--base-gpu-id") + 1]) for c in plan.servers[0].commands]
    assert gpu_ids == list(range(replicas)) and plan.servers[0].num_gpus == replicas


def test_the_batch_shell_stops_the_other_sruns_with_sigterm(tmp_path):
    """NeMo-Run's loop runs `kill -9 <srun>`; a SIGKILLed srun gets its tasks SIGKILLed at once."""
    from megatron_s2lpo.launch.sbatch import job_end_trap

    child = tmp_path / "srun.sh"
    child.write_text(f'trap "echo term > {tmp_path}/got; exit 0" TERM\ntouch {tmp_path}/ready\n'
                     "while true; do sleep 0.05; done\n")
    script = (f"{job_end_trap(['trainer'], max_retries=0)}\nbash {child} & other_pid=$!\n"
              f"while [ ! -e {tmp_path}/ready ]; do sleep 0.05; done\n"
              'kill -9 "$other_pid"\nwait "$other_pid"\n')
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30,
                          env={"PATH": os.environ["PATH"]})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "got").read_text() == "term\n"
