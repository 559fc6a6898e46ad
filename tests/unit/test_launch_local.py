"""One-machine experiments (LocalExecutor, DockerExecutor): what is built, without running it."""

from __future__ import annotations

import os
import shlex
import sys

import pytest

pytest.importorskip("nemo_run", reason="nemo-run is not installed (pip install -e .)")

import nemo_run as run  # noqa: E402

from megatron_s2lpo.launch.experiment import build_docker_experiment, build_local_experiment  # noqa: E402
from megatron_s2lpo.launch.supervisor import SupervisorSpec  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "examples", "tiny_cpu.yaml")
RECIPE_8B = os.path.join(REPO, "examples", "qwen3_8b_explorer_1p7b.yaml")


def _jobs(exp):
    return {job.id: job for job in exp.jobs}


def _spec(job) -> SupervisorSpec:
    """The supervisor spec inside the task's script (`exec python -m ...supervisor --spec-json '...'`)."""
    words = shlex.split(job.task.inline.splitlines()[-1])
    assert words[:4] == ["exec", words[1], "-m", "megatron_s2lpo.launch.supervisor"], words[:4]
    return SupervisorSpec.from_json(words[words.index("--spec-json") + 1])


def test_tiny_cpu_config_is_one_supervised_trainer(tmp_path):
    exp, plan = build_local_experiment(TINY, ("run.num_steps=2", f"run.output_dir={tmp_path}/run"),
                                       base_dir=str(tmp_path / "home"))
    jobs = _jobs(exp)
    assert list(jobs) == ["supervisor"]
    job = jobs["supervisor"]
    assert isinstance(job.executor, run.LocalExecutor)
    assert isinstance(job.task, run.Script)
    assert job.executor.env_vars["PYTHONUNBUFFERED"] == "1"
    assert job.task.inline.splitlines()[-1].startswith(f"exec {sys.executable} -m megatron_s2lpo.launch.supervisor ")
    spec = _spec(job)
    assert spec.servers == [] and spec.trainer_env == {}  # no CUDA_VISIBLE_DEVICES on a CPU run
    # the interpreter running this launch, the recipe by absolute path, the overrides; no resume
    assert spec.trainer_script == plan.trainer_script
    assert f"{sys.executable} -m megatron_s2lpo.cli train {TINY} run.num_steps=2 run.output_dir={tmp_path}/run " \
           "|| status=$?" in spec.trainer_script
    assert plan.servers == []


def test_gpu_recipe_on_one_machine_splits_the_gpus(tmp_path):
    # 8B at TP=2 on 4 GPUs is over the memory budget; this test is about the GPU split only
    exp, plan = build_local_experiment(RECIPE_8B, ("learner.tensor_parallel_size=2", "rollout.learner.tp_size=2",
                                                   "rollout.learner.replicas=1", "rollout.explorer.replicas=2"),
                                       num_gpus=8, learner_gpus=4, base_dir=str(tmp_path / "home"),
                                       allow_over_budget=True)
    spec = _spec(_jobs(exp)["supervisor"])
    env = {s.name: s.env["CUDA_VISIBLE_DEVICES"] for s in spec.servers}
    assert env == {"learner_server": "4,5", "explorer_server": "6,7"}
    assert spec.trainer_env == {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    trainer = spec.trainer_script
    assert ("wait_healthy --timeout-s 1800 \"http://127.0.0.1:30000\" \"http://127.0.0.1:30001\" "
            "\"http://127.0.0.1:30101\"") in trainer  # both explorer replicas, on their own ports
    assert (f"{sys.executable} -m torch.distributed.run --nnodes 1 --nproc-per-node 4 --node-rank 0 "
            "--master-addr \"127.0.0.1\"") in trainer
    assert '"sync.master_address=127.0.0.1"' in trainer
    learner_server = spec.servers[0].script
    assert "--tp-size 2 --dp-size 1" in learner_server
    assert f'exec "${{S2LPO_SGLANG_PYTHON:-{sys.executable}}}" -m sglang.launch_server' in learner_server
    explorer = spec.servers[1].script  # two replicas in one script, GPUs 0 and 1 of its slice
    assert "--port 30001 --tp-size 1 --dp-size 1 --base-gpu-id 0" in explorer
    assert "--port 30101 --tp-size 1 --dp-size 1 --base-gpu-id 1" in explorer


def test_one_machine_gpu_budget_is_checked(tmp_path):
    with pytest.raises(ValueError, match="the machine has 8 GPUs"):
        build_local_experiment(RECIPE_8B, (), num_gpus=8, base_dir=str(tmp_path / "home"))
    with pytest.raises(ValueError, match="learner_server replica 1 and explorer_server replica 0 would both listen "
                                         "on port 30100"):
        build_local_experiment(RECIPE_8B, (), num_gpus=8, base_dir=str(tmp_path / "home"), explorer_port=30100)


def test_docker_experiment_is_one_container_with_host_network_and_ipc(tmp_path):
    colocated = ("sync.transport=tensor", "rollout.learner.mem_fraction=0.3", "algo.t_mix=0")
    with pytest.raises(ValueError, match="needs cuda in the trainer's own environment"):  # a trainer without CUDA
        build_docker_experiment(RECIPE_8B, colocated, container_image="s2lpo:0.1", num_gpus=8, learner_gpus=8,
                                base_dir=str(tmp_path / "home0"), trainer_provides=())
    # the image's trainer (CUDA, SGLang kept apart) runs the colocated tensor transport
    exp, plan = build_docker_experiment(RECIPE_8B, colocated, container_image="s2lpo:0.1", num_gpus=8,
                                        learner_gpus=8, volumes=("/models:/models",),
                                        base_dir=str(tmp_path / "home"), explorer_port=30005)
    with pytest.raises(ValueError, match="need 24"):  # learner 8 + learner server 8 + explorer 8
        build_docker_experiment(RECIPE_8B, (), container_image="s2lpo:0.1", num_gpus=8,
                                base_dir=str(tmp_path / "home2"))
    jobs = _jobs(exp)
    assert list(jobs) == ["supervisor"]
    ex = jobs["supervisor"].executor
    assert isinstance(ex, run.DockerExecutor)
    assert (ex.container_image, ex.network, ex.ipc_mode, ex.volumes) == ("s2lpo:0.1", "host", "host",
                                                                         ["/models:/models"])
    spec = _spec(jobs["supervisor"])
    assert [s.name for s in spec.servers] == ["learner_server"]  # colocated; no explorer with t_mix=0
    assert spec.servers[0].env["CUDA_VISIBLE_DEVICES"] == spec.trainer_env["CUDA_VISIBLE_DEVICES"] == \
        "0,1,2,3,4,5,6,7"
    assert "<<'S2LPO_CONFIG_EOF'" in spec.trainer_script  # the config travels in the script
    assert jobs["supervisor"].task.inline.splitlines()[-1].startswith("exec python -m megatron_s2lpo.launch.")
