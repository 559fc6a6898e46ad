"""Slurm launches of the paper recipes, rendered by NeMo-Run's dry run (nothing is submitted)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys

import pytest

from megatron_s2lpo.rollout.sglang_server import _KEY_LAUNCHER

pytest.importorskip("nemo_run", reason="nemo-run is not installed (pip install -e .)")

from megatron_s2lpo.config import load_config  # noqa: E402
from megatron_s2lpo.launch.experiment import SlurmOptions, build_slurm_experiment, render_slurm  # noqa: E402
from megatron_s2lpo.launch.plan import ClusterLayout  # noqa: E402
from megatron_s2lpo.launch.walltime import (LaunchWarning, format_slurm_time, measured_step_time,  # noqa: E402
                                            parse_slurm_time, partition_time_limit)

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


def _experiment(tmp_path, recipe, overrides=(), nodes=None, layout=None, **opts):
    path = os.path.join(REPO, "examples", f"{recipe}.yaml")
    layout = ClusterLayout(num_nodes=nodes or EXPECTED[recipe][0], **(layout or {}))
    options = SlurmOptions(**{"account": "acct", "partition": "batch", "container_image": IMAGE, "time": "12:00:00",
                              "container_mounts": MOUNTS, "job_dir": str(tmp_path / "jobs"),
                              "step_time_s": 60.0 * RECIPE_STEP_MINUTES[recipe], **opts})
    return build_slurm_experiment(load_config(path, list(overrides)), path, layout, options,
                                  user_overrides=tuple(overrides), base_dir=str(tmp_path / "home"))


def _render(tmp_path, recipe, overrides=(), nodes=None, **opts):
    exp, plan = _experiment(tmp_path, recipe, overrides, nodes, **opts)
    return render_slurm(exp), plan


RECIPE_STEP_MINUTES = _load_launch_script().RECIPE_STEP_MINUTES


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
    assert _sbatch_values(sbatch, "mem") == ["0"] * len(components)  # all of each node's memory
    assert _sbatch_values(sbatch, "time") == ["12:00:00"] * len(components)
    # SIGUSR1 to the batch shell one stated step (23 min) plus 10 min plus the batch script's own
    # delays (3 x its 5 s monitor period), rounded up to the minute, before the limit
    lead = 60 * (RECIPE_STEP_MINUTES[recipe] + 11)
    assert _sbatch_values(sbatch, "signal") == [f"B:USR1@{lead}"] * len(components)
    assert sbatch.index("trap s2lpo_stop_trainer USR1") < sbatch.index("srun --het-group")
    assert 'local trainer="${pids[0]}"' in sbatch  # the trainer's srun is task 0
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
        assert "--no-container-mount-home" in srun  # a user's ~/.local must not shadow the image's packages
        # pyxis keeps the image's value of a variable the image defines unless it is named here
        names = re.search(r"--container-env (\S+)", srun).group(1).split(",")
        assert {"NCCL_DEBUG", "PYTHONUNBUFFERED", "S2LPO_EXPLORER_HOST"} <= set(names)
        mounts = re.search(r"--container-mounts (\S+)", srun).group(1).split(",")
        assert mounts[:3] == MOUNTS and mounts[3].endswith(":/nemo_run")
        assert "--overlap" not in srun
    trainer, learner_server, explorer_server = (_script_of(rendered, s) for s in sruns)
    assert (f"\npython -m torch.distributed.run --nnodes {learner_nodes} --nproc-per-node 8 "
            "--node-rank ${SLURM_NODEID:-0}") in trainer
    assert '--master-addr "${S2LPO_LEARNER_HOST}" --master-port 29500 -m megatron_s2lpo.cli train' in trainer
    cfg = load_config(os.path.join(REPO, "examples", f"{recipe}.yaml"))
    learner_model = cfg.rollout.learner.model_path
    explorer_model = cfg.rollout.explorer.model_path
    # every replica in the role's one task: its own port (+100 per replica) and GPUs, then `wait`
    tp = cfg.rollout.learner.tp_size
    # SGLang reads the job's key from the environment (sglang_server.API_KEY_ENV), not argv
    launcher = '"${S2LPO_SGLANG_PYTHON:-python}" -c ' + shlex.quote(_KEY_LAUNCHER.format(var="S2LPO_API_KEY"))
    for i in range(cfg.rollout.learner.replicas):
        assert (f'{launcher} --model-path {learner_model}'
                f" --host 0.0.0.0 --port {30000 + 100 * i} --tp-size {tp} --dp-size 1 --base-gpu-id {i * tp}"
                f" --mem-fraction-static 0.85 --random-seed {cfg.run.seed + i} &\n") in learner_server
    for i in range(cfg.rollout.explorer.replicas):
        assert (f'{launcher} --model-path {explorer_model}'
                f" --host 0.0.0.0 --port {30001 + 100 * i} --tp-size 1 --dp-size 1 --base-gpu-id {i}"
                f" --mem-fraction-static 0.85 --random-seed {cfg.run.seed + i} &\n") in explorer_server
    assert "${S2LPO_API_KEY}" not in learner_server + explorer_server  # the key is not on the command line
    assert learner_server.endswith("\nwait\n") and explorer_server.endswith("\nwait\n")
    learner_urls = ",".join(f"http://${{S2LPO_LEARNER_SERVER_HOST}}:{30000 + 100 * i}"
                            for i in range(cfg.rollout.learner.replicas))
    explorer_urls = ",".join(f"http://${{S2LPO_EXPLORER_HOST}}:{30001 + 100 * i}"
                             for i in range(cfg.rollout.explorer.replicas))
    # the job's key is made once in the sbatch script, before any srun, and appears nowhere in clear
    assert sbatch.index("export S2LPO_API_KEY=") < sbatch.index("srun --het-group")
    assert '"rollout.learner.api_key_env=S2LPO_API_KEY"' in trainer
    assert '"rollout.explorer.api_key_env=S2LPO_API_KEY"' in trainer
    assert not re.search(r"[0-9a-f]{32}", sbatch + "".join(rendered.scripts.values()))
    for generated in (f'"rollout.learner.urls=[{learner_urls}]"', f'"rollout.explorer.urls=[{explorer_urls}]"',
                      '"sync.transport=distributed"', '"sync.master_address=${S2LPO_LEARNER_HOST}"',
                      '"sync.master_port=29600"', '"run.resume=true"'):
        assert generated in trainer
    for text in [sbatch, *rendered.scripts.values()]:  # everything NeMo-Run wrote is valid bash
        subprocess.run(["bash", "-n"], input=text, text=True, check=True)


def test_colocated_learner_server_overlaps_the_trainer_on_the_first_learner_node(tmp_path):
    rendered, plan = _render(tmp_path, "qwen3_8b_explorer_1p7b",
                             ["sync.transport=tensor", "rollout.learner.mem_fraction=0.3"], nodes=3,
                             layout={"trainer_provides": ("cuda", "sglang")})
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
    rendered, _ = _render(tmp_path, "qwen3_8b_explorer_4b", ["algo.t_mix=3"], time="1-12:00:00", max_retries=2,
                          env={"NCCL_SOCKET_IFNAME": "ib0", "NCCL_IB_HCA": "=mlx5_0,mlx5_1", "ODD": "a b;$HOME 'q'"},
                          qos="high", constraint="h100&ib", gres="gpu:8", reservation="rl-week",
                          sbatch_args=["mail-type=END", "--comment=s2lpo run", "requeue"], signal_lead_s=1800)
    sbatch = rendered.sbatch
    assert _sbatch_values(sbatch, "time") == ["1-12:00:00"] * 3
    for flag, value in (("qos", "high"), ("constraint", "'h100&ib'"), ("gres", "gpu:8"), ("reservation", "rl-week"),
                        ("mail-type", "END"), ("signal", "B:USR1@1800")):
        assert _sbatch_values(sbatch, flag) == [value] * 3, flag
    assert sbatch.count("\n#SBATCH --comment='s2lpo run'\n") == 3
    assert sbatch.count("\n#SBATCH --requeue\n") == 3
    # the job's own end trap requeues (not NeMo-Run's, which requeues usage errors too)
    assert "export TORCHX_MAX_RETRIES=0" in sbatch
    assert 'if [ "${SLURM_RESTART_COUNT:-0}" -lt 2 ]; then' in sbatch
    assert 'scontrol requeue "$SLURM_JOB_ID"' in sbatch
    # values are exported exactly as given: run the export lines through bash
    exports = "\n".join(line for line in sbatch.splitlines() if line.startswith(("export NCCL_IB", "export ODD")))
    out = subprocess.run(["bash", "-c", exports + '\nprintf "%s|%s" "$NCCL_IB_HCA" "$ODD"'], capture_output=True,
                         text=True, check=True, env={"PATH": os.environ["PATH"], "HOME": "/h"}).stdout
    assert out == "=mlx5_0,mlx5_1|a b;$HOME 'q'"
    trainer = _script_of(rendered, _sruns(sbatch)[0])
    assert "\n  t_mix: 3\n" in trainer  # user overrides are resolved into the embedded config
    assert str(tmp_path / "jobs") in _sbatch_values(sbatch, "output")[0]


def test_the_batch_shell_hands_slurms_early_signal_to_the_trainers_srun(tmp_path):
    """The sbatch's own trap, run by bash: SIGUSR1 to the batch shell reaches pids[<trainer>] only,
    and at once, although the shell is inside a long sleep (as in NeMo-Run's monitor loop): a
    foreground sleep would hold the trap back for an hour here."""
    rendered, _ = _render(tmp_path, "qwen3_8b_explorer_1p7b", ["sync.transport=tensor",
                                                               "rollout.learner.mem_fraction=0.3"],
                          nodes=3, layout={"trainer_provides": ("cuda", "sglang")})
    sbatch = rendered.sbatch
    trap = sbatch[sbatch.index("sleep() {"):sbatch.index("trap s2lpo_stop_trainer USR1")]
    assert 'local trainer="${pids[1]}"' in trap  # the colocated server is task 0, the trainer task 1
    child = tmp_path / "srun.sh"  # stands in for an srun: records a SIGUSR1 it receives
    child.write_text(f'trap "echo got-usr1 > {tmp_path}/$1; exit 0" USR1\ntouch {tmp_path}/$1.ready\n'
                     "while true; do sleep 0.05; done\n")
    script = (f"{trap}trap s2lpo_stop_trainer USR1\n"
              f"bash {child} server & pids[0]=$!\n"
              f"bash {child} trainer & pids[1]=$!\n"
              f"while [ ! -e {tmp_path}/server.ready ] || [ ! -e {tmp_path}/trainer.ready ]; do sleep 0.05; done\n"
              "( command sleep 0.5; kill -USR1 $$ ) &\n"
              "sleep 3600\n"
              "wait ${pids[1]}\n"
              "kill ${pids[0]}\n")
    proc = subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=30)
    finally:  # nothing of it outlives the test
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 0, stderr
    assert "time limit near" in stdout
    assert (tmp_path / "trainer").read_text() == "got-usr1\n"
    assert not (tmp_path / "server").exists()


def test_chained_jobs_start_after_the_previous_one_ends(tmp_path, monkeypatch):
    exp, _ = _experiment(tmp_path, "qwen3_8b_explorer_1p7b", max_chained_jobs=2)
    rendered = render_slurm(exp)
    assert len(rendered.chained) == 2
    for chained in rendered.chained:  # the same job again: it resumes from the last checkpoint
        assert _sbatch_values(chained, "nodes") == _sbatch_values(rendered.sbatch, "nodes")
        assert "trap s2lpo_stop_trainer USR1" in chained
    trainer = rendered.scripts["qwen3_8b_explorer_1p7b-chain2-0.sh"]
    assert '"run.resume=true"' in trainer and "megatron_s2lpo.launch.run_state" in trainer
    # NeMo-Run's own submission path, with an `sbatch` that records its command line and answers
    # as `sbatch --parsable` does (the job id): each chained job depends on the one before.
    bin_dir, log = tmp_path / "bin", tmp_path / "sbatch.log"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/bash\necho "$*" >> {log}\necho $((1000 + $(wc -l < {log})))\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    exp, _ = _experiment(tmp_path, "qwen3_8b_explorer_1p7b", max_chained_jobs=2)
    with exp:
        exp.run(detach=True)
    calls = log.read_text().splitlines()
    assert [re.search(r"--dependency=(\S+)", c).group(1) if "--dependency" in c else None for c in calls] == [
        None, "afterany:1001", "afterany:1002"]
    assert calls[2].endswith("qwen3_8b_explorer_1p7b-chain2_sbatch.sh")
    with pytest.raises(ValueError, match="drop --no-resume"):
        _experiment(tmp_path, "qwen3_8b_explorer_1p7b", max_chained_jobs=1, layout={"resume": False})


def test_save_every_must_fit_in_the_walltime(tmp_path):
    with pytest.raises(ValueError, match=r"run.save_every=10 x 23.0 min per step \(stated for the recipe\) = 230 min "
                                         r"does not fit .* lower run.save_every to 8, or ask for --time 04:34:00"):
        _experiment(tmp_path, "qwen3_8b_explorer_1p7b", time="04:00:00")
    _experiment(tmp_path, "qwen3_8b_explorer_1p7b", ["run.save_every=8"], time="04:00:00")
    with pytest.raises(ValueError, match=r"run.save_every=0 \(a checkpoint only after the last of 200 steps\)"):
        _experiment(tmp_path, "qwen3_8b_explorer_1p7b", ["run.save_every=0"])
    with pytest.raises(ValueError, match="not shorter than the job's time limit"):
        _experiment(tmp_path, "qwen3_8b_explorer_1p7b", time="00:30:00", signal_lead_s=1800)
    with pytest.warns(LaunchWarning, match="no step time is known"):
        _experiment(tmp_path, "qwen3_8b_explorer_1p7b", time="04:00:00", step_time_s=0.0)
    with pytest.warns(LaunchWarning, match="leaves less than a step"):
        _experiment(tmp_path, "qwen3_8b_explorer_1p7b", signal_lead_s=120)
    with pytest.warns(LaunchWarning, match="under none of the container mounts"):
        _experiment(tmp_path, "qwen3_8b_explorer_1p7b", container_mounts=["/lustre/models:/models"])


def test_a_measured_step_time_wins_over_the_stated_one(tmp_path):
    host = tmp_path / "ckpt"
    (host / "qwen3_8b_explorer_1p7b").mkdir(parents=True)
    records = [{"step": i, "time/step": 40.0 * 60 if i == 3 else 20.0 * 60} for i in range(1, 5)]
    (host / "qwen3_8b_explorer_1p7b" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    mounts = [f"{host}:/checkpoints", "/lustre/models:/models"]
    assert measured_step_time("/checkpoints/qwen3_8b_explorer_1p7b", mounts) == (
        2400.0, str(host / "qwen3_8b_explorer_1p7b" / "metrics.jsonl"))  # the slowest recent step
    with pytest.raises(ValueError, match=r"40.0 min per step \(measured in .*metrics.jsonl\)"):
        _experiment(tmp_path, "qwen3_8b_explorer_1p7b", time="06:00:00", container_mounts=mounts)


@pytest.mark.parametrize("text, seconds", [
    ("90", 5400), ("90:30", 5430), ("04:00:00", 14400), ("2-00", 172800), ("1-02:03", 93780),
    ("1-02:03:04", 93784), ("UNLIMITED", None), ("infinite", None)])
def test_slurm_time_formats(text, seconds):
    assert parse_slurm_time(text) == seconds
    if seconds:
        assert parse_slurm_time(format_slurm_time(seconds)) == seconds


def test_the_partitions_maximum_is_read_from_sinfo():
    seen = []

    def sinfo(command):
        seen.append(command)
        return "2-00:00:00\n"

    assert partition_time_limit("batch", sinfo) == "2-00:00:00"
    assert seen == ["sinfo --noheader --partition batch --format %l"]
    with pytest.raises(ValueError, match="has no time limit .*pass --time"):
        partition_time_limit("batch", lambda _: "infinite\n")
    with pytest.raises(ValueError, match="knows no partition 'gpu'"):
        partition_time_limit("gpu", lambda _: "")

    def no_sinfo(_):
        raise FileNotFoundError("sinfo")

    with pytest.raises(ValueError, match="could not read partition 'batch'.*pass --time"):
        partition_time_limit("batch", no_sinfo)


def test_single_group_job_is_not_heterogeneous(tmp_path):
    rendered, plan = _render(tmp_path, "qwen3_8b_explorer_1p7b", ["algo.t_mix=0", "sync.transport=tensor",
                                                              "rollout.learner.mem_fraction=0.5"], nodes=2,
                             layout={"trainer_provides": ("cuda", "sglang")})
    assert "hetjob" not in rendered.sbatch and "--het-group" not in rendered.sbatch
    assert 'export S2LPO_LEARNER_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in rendered.sbatch
    assert len(_sruns(rendered.sbatch)) == 2  # colocated learner server + trainer, no explorer


def test_slurm_options_errors():
    good = {"account": "a", "partition": "p", "container_image": "i", "time": "04:00:00"}
    for key, flag in (("account", "--account"), ("partition", "--partition")):
        with pytest.raises(ValueError, match=flag):
            SlurmOptions(**{**good, key: ""})
    for bad, message in (({"container_mounts": ["/models"]}, "/host/path:/container/path"),
                         ({"container_image": "", "container_mounts": ["/a:/b"]}, "without --container-image"),
                         ({"startup_s": -1}, "--startup-time must be >= 0"),
                         ({"time": "forever"}, "not a Slurm time"), ({"time": "UNLIMITED"}, "finite time limit"),
                         ({"signal_lead_s": 70000}, "0..65535"), ({"env": {"1X": "y"}}, "environment variable names"),
                         ({"sbatch_args": ["time=1:00:00"]}, r"--time is set by the launcher \(use --time\)"),
                         ({"sbatch_args": ["nodes=9"]}, "set by the launcher"),
                         ({"sbatch_args": ["--"]}, "must look like KEY=VALUE")):
        with pytest.raises(ValueError, match=message):
            SlurmOptions(**{**good, **bad})


def test_examples_launch_dryrun_prints_the_sbatch_script(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NEMORUN_HOME", str(tmp_path / "home"))
    launch = _load_launch_script()
    base = ["--recipe", "qwen3_8b_explorer_1p7b", "--executor", "slurm", "--account", "A", "--partition", "P",
            "--container-image", "IMG", "--mounts", "/m:/models,/c:/checkpoints", "--job-dir", str(tmp_path / "jobs"),
            "--dryrun"]
    # no --time: the partition's maximum, from sinfo where Slurm is (this machine here)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sinfo = '#!/bin/bash\n[ "$*" = "--noheader --partition P --format %l" ] && echo 2-00:00:00\n'
    (bin_dir / "sinfo").write_text(sinfo)
    (bin_dir / "sinfo").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    assert launch.main([*base, "--max-chained-jobs", "1", "algo.t_mix=4"]) == 0
    out = capsys.readouterr().out
    assert out.count("#SBATCH hetjob") == 4 and "--container-image IMG" in out  # the job and its chained copy
    assert "#SBATCH --time=2-00:00:00" in out and "# ---- chained job 1" in out
    assert 'run_module("sglang.launch_server", run_name="__main__", alter_sys=True)\' --model-path /models/Qwen3-1.7B-Base' in out
    with pytest.raises(SystemExit):
        launch.parse_args(["--recipe", "x", "--bogus"])
    with pytest.raises(FileNotFoundError, match="qwen3_8b_explorer_1p7b"):
        launch.recipe_path("nope")


@pytest.mark.parametrize("argv, message", [
    (["--account", "", "--time", "9:00:00"], "--executor slurm needs --account"),
    (["--partition", "", "--time", "9:00:00"], "needs --partition"),
    (["--container-image", "", "--time", "9:00:00"], "needs --container-image (the image built from the "
     "Dockerfile; the site needs pyxis) or, without a container, the environment the job runs in: --venv DIR"),
    (["--time", "9:00:00", "--venv", "/nonexistent"], "--venv / --python name the environment of a job without"),
    (["--time", "04:00:00"], "lower run.save_every to 8"),
    (["--time", "12:00:00", "--nodes", "2"], "leaves no node for the learner"),
    (["--time", "12:00:00", "--colocate", "--nodes", "3", "--trainer-provides", "",
      "rollout.learner.mem_fraction=0.3"], "needs cuda in the trainer's own environment"),
    (["--time", "12:00:00", "--env", "NOEQUALS"], "must look like KEY=VALUE"),
])
def test_examples_launch_usage_errors_name_the_fix(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setenv("NEMORUN_HOME", str(tmp_path / "home"))
    launch = _load_launch_script()
    defaults = {"--account": "A", "--partition": "P", "--container-image": "IMG"}
    for flag in list(defaults):
        if flag in argv:
            defaults.pop(flag)
    args = ["--recipe", "qwen3_8b_explorer_1p7b", "--dryrun", "--mounts", "/c:/checkpoints",
            *[x for kv in defaults.items() for x in kv], *argv]
    with pytest.raises(SystemExit) as exit_:
        launch.main(args)
    assert exit_.value.code == 2  # argparse's usage error, not a traceback
    err = capsys.readouterr().err
    assert "usage:" in err and message in err


def test_importing_the_package_does_not_import_nemo_run():
    code = ("import sys, megatron_s2lpo, megatron_s2lpo.launch, megatron_s2lpo.launch.plan; "
            "print('nemo_run' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"
