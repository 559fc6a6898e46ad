"""Slurm launches of the paper recipes, rendered by NeMo-Run's dry run (nothing is submitted)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("nemo_run", reason="nemo-run is not installed (pip install -e .)")

from megatron_s2lpo.config import load_config  # noqa: E402
from megatron_s2lpo.launch.experiment import SlurmOptions, build_slurm_experiment, render_slurm  # noqa: E402
from megatron_s2lpo.launch.plan import ClusterLayout  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMAGE = "registry.example.com/s2lpo:0.1.0"
MOUNTS = ["/lustre/models:/models", "/lustre/data:/data", "/lustre/ckpt:/checkpoints"]
# recipe -> (nodes, [(nodes, gpus per node) per het component], learner torchrun nodes)
EXPECTED = {
    "qwen3_8b_explorer_1p7b": (4, [(2, 8), (1, 8), (1, 8)], 2),
    "qwen3_8b_explorer_4b": (4, [(2, 8), (1, 8), (1, 8)], 2),
    "qwen3_14b_explorer_4b": (6, [(4, 8), (1, 8), (1, 8)], 4),
}


@pytest.fixture(autouse=True)
def _stdin_devnull(monkeypatch):
    # NeMo-Run's packaging step runs `mkdir` through invoke, which reads stdin; pytest forbids that.
    with open(os.devnull) as devnull:
        monkeypatch.setattr(sys, "stdin", devnull)
        yield


def _load_launch_script():
    spec = importlib.util.spec_from_file_location("examples_launch", os.path.join(REPO, "examples", "launch.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _render(tmp_path, recipe, overrides=(), nodes=None, **opts):
    path = os.path.join(REPO, "examples", f"{recipe}.yaml")
    layout = ClusterLayout(num_nodes=nodes or EXPECTED[recipe][0])
    options = SlurmOptions(account="acct", partition="batch", container_image=IMAGE, container_mounts=MOUNTS,
                           job_dir=str(tmp_path / "jobs"), **opts)
    exp, plan = build_slurm_experiment(load_config(path, list(overrides)), path, layout, options,
                                       user_overrides=tuple(overrides), base_dir=str(tmp_path / "home"))
    return render_slurm(exp), plan


def _sbatch_values(sbatch: str, flag: str) -> list[str]:
    return re.findall(rf"^#SBATCH --{flag}=(\S+)$", sbatch, re.M)


def _sruns(sbatch: str) -> list[str]:
    return [line for line in sbatch.splitlines() if line.startswith("srun ")]


def _script_of(rendered, srun: str) -> str:
    return rendered.scripts[re.search(r"bash /nemo_run/scripts/(\S+\.sh)", srun).group(1)]


@pytest.mark.parametrize("recipe", sorted(EXPECTED))
def test_recipe_renders_a_heterogeneous_job(tmp_path, recipe):
    rendered, plan = _render(tmp_path, recipe)
    sbatch = rendered.sbatch
    nodes, components, learner_nodes = EXPECTED[recipe]
    # one het component per node group: learner, learner server, explorer server
    assert sbatch.count("#SBATCH hetjob") == len(components) - 1
    assert [int(n) for n in _sbatch_values(sbatch, "nodes")] == [n for n, _ in components]
    assert [int(g) for g in _sbatch_values(sbatch, "gpus-per-node")] == [g for _, g in components]
    assert sum(int(n) for n in _sbatch_values(sbatch, "nodes")) == nodes
    assert _sbatch_values(sbatch, "ntasks-per-node") == ["1"] * len(components)
    assert _sbatch_values(sbatch, "account") == ["acct"] * len(components)
    assert _sbatch_values(sbatch, "partition") == ["batch"] * len(components)
    assert sbatch.count("#SBATCH --exclusive") == len(components)
    # hosts resolved outside the container, per component, before any srun
    exports = re.findall(r'^export (S2LPO_\w+_HOST)=\$\(scontrol show hostnames "\$SLURM_JOB_NODELIST_HET_GROUP_(\d)"'
                         r" \| head -n1\)$", sbatch, re.M)
    assert exports == [("S2LPO_LEARNER_HOST", "0"), ("S2LPO_LEARNER_SERVER_HOST", "1"), ("S2LPO_EXPLORER_HOST", "2")]
    assert sbatch.index("export S2LPO_EXPLORER_HOST") < sbatch.index("srun --het-group")
    for var, value in (("NCCL_DEBUG", "WARN"), ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
                       ("CUDA_DEVICE_MAX_CONNECTIONS", "1")):
        assert f"\nexport {var}={value}\n" in sbatch
    # trainer, learner server, explorer server: one srun each, in the container, with the mounts
    sruns = _sruns(sbatch)
    assert [re.search(r"--het-group=(\d)", s).group(1) for s in sruns] == ["0", "1", "2"]
    for srun in sruns:
        assert f"--container-image {IMAGE}" in srun
        mounts = re.search(r"--container-mounts (\S+)", srun).group(1).split(",")
        assert mounts[:3] == MOUNTS and mounts[3].endswith(":/nemo_run")
        assert "--overlap" not in srun
    trainer, learner_server, explorer_server = (_script_of(rendered, s) for s in sruns)
    assert f"exec torchrun --nnodes {learner_nodes} --nproc-per-node 8 --node-rank ${{SLURM_NODEID:-0}}" in trainer
    assert '--master-addr "${S2LPO_LEARNER_HOST}" --master-port 29500 -m megatron_s2lpo.cli train' in trainer
    cfg = load_config(os.path.join(REPO, "examples", f"{recipe}.yaml"))
    learner_model = cfg.rollout.learner.model_path
    explorer_model = cfg.rollout.explorer.model_path
    # every replica in the role's one task: its own port (+100 per replica) and GPUs, then `wait`
    tp = cfg.rollout.learner.tp_size
    for i in range(cfg.rollout.learner.replicas):
        assert (f'"${{S2LPO_SGLANG_PYTHON:-python}}" -m sglang.launch_server --model-path {learner_model}'
                f" --host 0.0.0.0 --port {30000 + 100 * i} --tp-size {tp} --dp-size 1 --base-gpu-id {i * tp}"
                f" --mem-fraction-static 0.85 --random-seed {cfg.run.seed + i} &\n") in learner_server
    for i in range(cfg.rollout.explorer.replicas):
        assert (f'"${{S2LPO_SGLANG_PYTHON:-python}}" -m sglang.launch_server --model-path {explorer_model}'
                f" --host 0.0.0.0 --port {30001 + 100 * i} --tp-size 1 --dp-size 1 --base-gpu-id {i}"
                f" --mem-fraction-static 0.85 --random-seed {cfg.run.seed + i} &\n") in explorer_server
    assert learner_server.endswith("\nwait\n") and explorer_server.endswith("\nwait\n")
    learner_urls = ",".join(f"http://${{S2LPO_LEARNER_SERVER_HOST}}:{30000 + 100 * i}"
                            for i in range(cfg.rollout.learner.replicas))
    explorer_urls = ",".join(f"http://${{S2LPO_EXPLORER_HOST}}:{30001 + 100 * i}"
                             for i in range(cfg.rollout.explorer.replicas))
    for generated in (f'"rollout.learner.urls=[{learner_urls}]"', f'"rollout.explorer.urls=[{explorer_urls}]"',
                      '"sync.transport=distributed"', '"sync.master_address=${S2LPO_LEARNER_HOST}"',
                      '"sync.master_port=29600"', '"run.resume=true"'):
        assert generated in trainer
    for text in [sbatch, *rendered.scripts.values()]:  # everything NeMo-Run wrote is valid bash
        subprocess.run(["bash", "-n"], input=text, text=True, check=True)


def test_colocated_learner_server_overlaps_the_trainer_on_the_first_learner_node(tmp_path):
    rendered, plan = _render(tmp_path, "qwen3_8b_explorer_1p7b",
                             ["sync.transport=tensor", "rollout.learner.mem_fraction=0.3"], nodes=3)
    sbatch = rendered.sbatch
    assert [int(n) for n in _sbatch_values(sbatch, "nodes")] == [2, 1]
    server, trainer, explorer = _sruns(sbatch)
    assert "--het-group=0" in server and "--het-group=0" in trainer and "--het-group=1" in explorer
    assert server.split(" bash ")[0].endswith("--overlap --nodes=1 --ntasks=1 --nodelist=${S2LPO_LEARNER_HOST}")
    assert trainer.split(" bash ")[0].endswith("--overlap")
    assert "--overlap" not in explorer
    assert "--enable-memory-saver" in _script_of(rendered, server)
    assert '"sync.transport=tensor"' in _script_of(rendered, trainer)
    assert "S2LPO_LEARNER_SERVER_HOST" not in sbatch


def test_user_options_reach_the_job(tmp_path):
    rendered, _ = _render(tmp_path, "qwen3_8b_explorer_4b", ["algo.t_mix=3"], time="12:00:00", max_retries=2,
                          env={"NCCL_SOCKET_IFNAME": "ib0"})
    assert _sbatch_values(rendered.sbatch, "time") == ["12:00:00"] * 3
    assert "export TORCHX_MAX_RETRIES=2" in rendered.sbatch
    assert "\nexport NCCL_SOCKET_IFNAME=ib0\n" in rendered.sbatch
    assert 'scontrol requeue "$SLURM_JOB_ID"' in rendered.sbatch
    trainer = _script_of(rendered, _sruns(rendered.sbatch)[0])
    assert "\n  t_mix: 3\n" in trainer  # user overrides are resolved into the embedded config
    assert str(tmp_path / "jobs") in _sbatch_values(rendered.sbatch, "output")[0]


def test_single_group_job_is_not_heterogeneous(tmp_path):
    rendered, plan = _render(tmp_path, "qwen3_8b_explorer_1p7b", ["algo.t_mix=0", "sync.transport=tensor"], nodes=2)
    assert "hetjob" not in rendered.sbatch and "--het-group" not in rendered.sbatch
    assert 'export S2LPO_LEARNER_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in rendered.sbatch
    assert len(_sruns(rendered.sbatch)) == 2  # colocated learner server + trainer, no explorer


def test_slurm_options_errors():
    with pytest.raises(ValueError, match="--container-image"):
        SlurmOptions(account="a", container_image="")
    with pytest.raises(ValueError, match="/host/path:/container/path"):
        SlurmOptions(account="a", container_image="i", container_mounts=["/models"])


def test_examples_launch_dryrun_prints_the_sbatch_script(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NEMORUN_HOME", str(tmp_path / "home"))
    launch = _load_launch_script()
    assert launch.main(["--recipe", "qwen3_8b_explorer_1p7b", "--executor", "slurm", "--account", "A",
                        "--partition", "P", "--container-image", "IMG", "--mounts", "/m:/models",
                        "--job-dir", str(tmp_path / "jobs"), "--dryrun", "algo.t_mix=4"]) == 0
    out = capsys.readouterr().out
    assert out.count("#SBATCH hetjob") == 2 and "--container-image IMG" in out
    assert '-m sglang.launch_server --model-path /models/Qwen3-1.7B-Base' in out
    with pytest.raises(SystemExit):
        launch.parse_args(["--recipe", "x", "--bogus"])
    with pytest.raises(FileNotFoundError, match="qwen3_8b_explorer_1p7b"):
        launch.recipe_path("nope")


def test_importing_the_package_does_not_import_nemo_run():
    code = ("import sys, megatron_s2lpo, megatron_s2lpo.launch, megatron_s2lpo.launch.plan; "
            "print('nemo_run' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"
