"""One-machine experiments (LocalExecutor, DockerExecutor): what is built, without running it."""

from __future__ import annotations

import os
import sys

import pytest

pytest.importorskip("nemo_run", reason="nemo-run is not installed (pip install -e .)")

import nemo_run as run  # noqa: E402

from megatron_s2lpo.launch.experiment import build_docker_experiment, build_local_experiment  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "examples", "tiny_cpu.yaml")
RECIPE_8B = os.path.join(REPO, "examples", "qwen3_8b_explorer_1p7b.yaml")


def _jobs(exp):
    return {job.id: job for job in exp.jobs}


def test_tiny_cpu_config_is_one_local_trainer_task(tmp_path):
    exp, plan = build_local_experiment(TINY, ("run.num_steps=2", f"run.output_dir={tmp_path}/run"),
                                       base_dir=str(tmp_path / "home"))
    jobs = _jobs(exp)
    assert list(jobs) == ["trainer"]
    job = jobs["trainer"]
    assert isinstance(job.executor, run.LocalExecutor)
    assert isinstance(job.task, run.Script)
    assert "CUDA_VISIBLE_DEVICES" not in job.executor.env_vars
    assert job.executor.env_vars["PYTHONUNBUFFERED"] == "1"
    # the interpreter running this launch, the recipe by absolute path, the overrides; no resume
    assert job.task.inline == (f"set -euo pipefail\nexec {sys.executable} -m megatron_s2lpo.cli train {TINY} "
                               f"run.num_steps=2 run.output_dir={tmp_path}/run\n")
    assert plan.servers == []


def test_gpu_recipe_on_one_machine_splits_the_gpus(tmp_path):
    exp, plan = build_local_experiment(RECIPE_8B, ("learner.tensor_parallel_size=2", "rollout.learner.tp_size=2",
                                                   "rollout.learner.replicas=1", "rollout.explorer.replicas=2"),
                                       num_gpus=8, learner_gpus=4, base_dir=str(tmp_path / "home"))
    jobs = _jobs(exp)
    assert list(jobs) == ["trainer", "learner_server", "explorer_server"]
    env = {name: job.executor.env_vars["CUDA_VISIBLE_DEVICES"] for name, job in jobs.items()}
    assert env == {"trainer": "0,1,2,3", "learner_server": "4,5", "explorer_server": "6,7"}
    trainer = jobs["trainer"].task.inline
    assert ("wait_healthy --timeout-s 1800 \"http://127.0.0.1:30000\" \"http://127.0.0.1:30001\" "
            "\"http://127.0.0.1:30101\"") in trainer  # both explorer replicas, on their own ports
    assert "torchrun --nnodes 1 --nproc-per-node 4 --node-rank 0 --master-addr \"127.0.0.1\"" in trainer
    assert '"sync.master_address=127.0.0.1"' in trainer
    assert "--tp-size 2 --dp-size 1" in jobs["learner_server"].task.inline
    explorer = jobs["explorer_server"].task.inline  # two replicas in one task, GPUs 0 and 1 of its slice
    assert "--port 30001 --tp-size 1 --dp-size 1 --base-gpu-id 0" in explorer
    assert "--port 30101 --tp-size 1 --dp-size 1 --base-gpu-id 1" in explorer


def test_one_machine_gpu_budget_is_checked(tmp_path):
    with pytest.raises(ValueError, match="the machine has 8 GPUs"):
        build_local_experiment(RECIPE_8B, (), num_gpus=8, base_dir=str(tmp_path / "home"))
    with pytest.raises(ValueError, match="learner_server replica 1 and explorer_server replica 0 would both listen "
                                         "on port 30100"):
        build_local_experiment(RECIPE_8B, (), num_gpus=8, base_dir=str(tmp_path / "home"), explorer_port=30100)


def test_docker_experiment_uses_host_network_and_ipc(tmp_path):
    exp, plan = build_docker_experiment(RECIPE_8B, ("sync.transport=tensor", "rollout.learner.mem_fraction=0.3",
                                                    "algo.t_mix=0"),
                                        container_image="s2lpo:0.1", num_gpus=8, learner_gpus=8,
                                        volumes=("/models:/models",), base_dir=str(tmp_path / "home"),
                                        explorer_port=30005)
    jobs = _jobs(exp)
    with pytest.raises(ValueError, match="need 24"):  # learner 8 + learner server 8 + explorer 8
        build_docker_experiment(RECIPE_8B, (), container_image="s2lpo:0.1", num_gpus=8,
                                base_dir=str(tmp_path / "home2"))
    assert list(jobs) == ["learner_server", "trainer"]  # colocated server first; no explorer with t_mix=0
    for job in jobs.values():
        ex = job.executor
        assert isinstance(ex, run.DockerExecutor)
        assert (ex.container_image, ex.network, ex.ipc_mode, ex.volumes) == ("s2lpo:0.1", "host", "host",
                                                                             ["/models:/models"])
    assert jobs["trainer"].executor.env_vars["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"
    assert "<<'S2LPO_CONFIG_EOF'" in jobs["trainer"].task.inline  # the config travels in the script
