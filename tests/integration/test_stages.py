"""End to end on CPU: a multi-stage run through every method, and its resume after a SIGKILL.

Five short stages of examples/tiny_bridge_cpu.yaml's models: teacher GRPO with an annealed
sampling temperature (the token-level baseline), forward-KL warmup against the teacher's
top-k, OPD in advantage mode, OPD in direct-loss mode, and S2L-PO of the student with the
trained teacher as explorer. Real components throughout (megatron learner on gloo, local
engines and teacher scoring, math-verify). The killed run is stopped inside the OPD stage and
resumed with --resume; every stage's per-step metrics must equal the uninterrupted run's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from process_control import kill_after_checkpoint, run_ok, without_timing

from megatron_s2lpo.trainer.metrics import read_metrics

REPO_ROOT = Path(__file__).resolve().parents[2]
STAGES = [
    {"name": "teacher_grpo", "method": "grpo", "policy": "teacher", "num_steps": 2,
     "overrides": ["rollout.learner.sampling.temperature=1.2", "algo.temperature.schedule=linear",
                   "algo.temperature.end=1.0", "algo.temperature.steps=1"]},
    {"name": "warmup", "method": "forward_kl", "policy": "student", "frozen": "teacher", "num_steps": 2},
    {"name": "opd", "method": "opd", "policy": "student", "frozen": "teacher", "num_steps": 3},
    {"name": "opd_loss", "method": "opd", "policy": "student", "frozen": "teacher", "num_steps": 1,
     "overrides": ["algo.distill.opd_mode=loss"]},
    {"name": "student_s2lpo", "method": "s2lpo", "policy": "student", "frozen": "teacher", "num_steps": 2,
     "overrides": ["algo.t_mix=2"]},
]


def tiny_recipe(path: Path, output_dir: Path) -> Path:
    data = yaml.safe_load((REPO_ROOT / "examples" / "tiny_bridge_cpu.yaml").read_text())
    data["run"].update(output_dir=str(output_dir), save_every=1, eval_num_samples=2)
    data["data"].update(prompts_per_step=4)
    data["data"]["synthetic"].update(num_eval=4)
    data["algo"].update(group_size=4, mini_batches_per_step=2)
    data["algo"]["distill"]["top_k"] = 4
    data["models"].pop("student_direct")  # the demo's baseline model
    data["models"]["teacher"]["init_sft_steps"] = 40
    data["models"]["student"]["init_sft_steps"] = 20
    data["sync"]["parity_every"] = 2
    data["stages"] = STAGES
    path.write_text(yaml.safe_dump(data))
    return path


def train_command(recipe: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "megatron_s2lpo.cli", "train", str(recipe), *extra]


def run(recipe: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_ok(train_command(recipe, *extra), REPO_ROOT, timeout_s=600)


def stage_metrics(out: Path, index: int) -> list[dict]:
    stage = STAGES[index]
    return read_metrics(str(out / "stages" / f"{index + 1:02d}-{stage['name']}" / "metrics.jsonl"))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    base = tmp_path_factory.mktemp("stages")
    out = base / "run"
    proc = run(tiny_recipe(base / "recipe.yaml", out))
    return out, proc


@pytest.mark.slow
@pytest.mark.timeout(700)
def test_every_stage_runs_and_hands_its_model_on(full_run) -> None:
    out, proc = full_run
    state = json.loads((out / "stages.json").read_text())
    assert [d["name"] for d in state["done"]] == [s["name"] for s in STAGES]
    assert state["models"] == {"teacher": str(out / "stages" / "01-teacher_grpo" / "hf"),
                               "student": str(out / "stages" / "05-student_s2lpo" / "hf")}
    for done in state["done"]:
        assert (Path(done["hf_dir"]) / "config.json").is_file() and done["eval_end"] is not None
    for index, stage in enumerate(STAGES):
        records = stage_metrics(out, index)
        assert [r["step"] for r in records] == list(range(stage["num_steps"] + 1))  # step 0: eval at start
        assert "eval/avg_at_k" in records[0] and "eval/avg_at_k" in records[-1]
    teacher, warmup, opd, opd_loss, s2lpo = (stage_metrics(out, i)[1:] for i in range(5))
    assert [r["temperature"] for r in teacher] == pytest.approx([1.2, 1.0])
    for r in warmup:  # all samples from the teacher; distributional forward KL against its top-4
        assert r["G_w"] == 4 and r["share/explorer"] == 1.0 and r["time/teacher"] > 0
        assert r["train/nll"] > 0 and r["train/fkl_kl"] >= -1e-6
    for r in opd:
        assert r["share/learner"] == 1.0 and "distill/reverse_kl" in r and "distill/advantage" in r
        assert "train/pg_loss" in r and "train/clip_frac" in r
    assert "train/reverse_kl" in opd_loss[0] and "train/pg_loss" not in opd_loss[0]
    assert s2lpo[0]["G_w"] > 0 and s2lpo[-1]["G_w"] == 0  # the trained teacher explores, annealed away
    assert "stage" in proc.stdout and "student_s2lpo" in proc.stdout.splitlines()[-1]  # the summary table
    # the warmup moved the student: its exported weights differ from the initial model's
    from safetensors.torch import load_file

    initial = load_file(str(next((out / "models" / "student").glob("*.safetensors"))))
    warmed = load_file(str(next((out / "stages" / "02-warmup" / "hf").glob("*.safetensors"))))
    assert any(not initial[k].equal(warmed[k]) for k in initial)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_resume_after_a_kill_inside_a_stage_is_exact(full_run, tmp_path: Path) -> None:
    out_full, _ = full_run
    out = tmp_path / "run"
    recipe = tiny_recipe(tmp_path / "recipe.yaml", out)
    latest = out / "stages" / "03-opd" / "checkpoints" / "latest"
    kill_after_checkpoint(train_command(recipe), REPO_ROOT, latest, what="the OPD stage's first checkpoint",
                          timeout_s=500)
    killed_at = int(latest.read_text().strip().split("_")[1])
    assert killed_at < STAGES[2]["num_steps"], "the OPD stage finished before it could be killed"
    state = json.loads((out / "stages.json").read_text())
    assert [d["name"] for d in state["done"]] == ["teacher_grpo", "warmup"]
    with pytest.raises(AssertionError, match="--resume"):
        run(recipe)  # a fresh start refuses the directory
    run(recipe, "--resume")
    for index in range(len(STAGES)):
        want = [without_timing(r) for r in stage_metrics(out_full, index)]
        got = [without_timing(r) for r in stage_metrics(out, index)]
        assert got == want, f"stage {STAGES[index]['name']} differs after resuming from OPD step {killed_at}"


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_stage_killed_after_its_last_checkpoint_exports_on_resume(full_run, tmp_path: Path) -> None:
    """The window between a stage's final checkpoint and its export: the state file does not
    list the stage yet and its hf/ is missing. --resume runs no steps, exports the checkpoint's
    weights and finishes, with the same model as the uninterrupted run."""
    import shutil

    from safetensors.torch import load_file

    out_full, _ = full_run
    out = tmp_path / "run"
    shutil.copytree(out_full, out)
    state_path = out / "stages.json"
    state = json.loads(state_path.read_text().replace(str(out_full), str(out)))
    last = state["done"].pop()
    state["models"]["student"] = str(out / "stages" / "04-opd_loss" / "hf")
    state_path.write_text(json.dumps(state))
    shutil.rmtree(last["hf_dir"])
    recipe = tiny_recipe(tmp_path / "recipe.yaml", out)
    proc = run(recipe, "--resume")
    banner = next(line for line in proc.stdout.splitlines() if line.startswith("=== stage 5/5"))
    assert banner.endswith("(resumed)") and "\nstep " not in proc.stdout  # no step ran again
    resumed = json.loads(state_path.read_text())
    assert [d["name"] for d in resumed["done"]] == [s["name"] for s in STAGES]
    want = load_file(str(next((out_full / "stages" / "05-student_s2lpo" / "hf").glob("*.safetensors"))))
    got = load_file(str(next(Path(resumed["done"][-1]["hf_dir"]).glob("*.safetensors"))))
    assert want.keys() == got.keys() and all(want[k].equal(got[k]) for k in want)
    assert [without_timing(r) for r in stage_metrics(out, 4)] == [without_timing(r) for r in stage_metrics(out_full, 4)]
