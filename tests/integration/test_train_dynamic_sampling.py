"""End to end on CPU with DAPO's dynamic sampling and overlong shaping on (algo.dynamic_sampling,
reward.overlong), one step ahead (run.max_staleness=1): the run logs the new metrics, and a run
SIGKILLed while a step over-samples resumes exactly.

The tiny recipe, small (real megatron learner, local engines, math-verify), with a weak warm start
so that many groups are uniform (all solved or all failed) and steps need several rounds."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest
from process_control import kill_on_output, run_ok, without_timing

from megatron_s2lpo.trainer.metrics import read_metrics
from megatron_s2lpo.trainer.pipeline import PENDING_FILE, PENDING_STATS_FILE

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(REPO_ROOT / "examples" / "tiny_cpu.yaml")
NUM_STEPS = 6
OVERRIDES = ["run.num_steps=%d" % NUM_STEPS, "run.save_every=2", "run.eval_every=3", "run.eval_num_samples=2",
             "run.max_staleness=1", "data.prompts_per_step=4", "data.synthetic.num_eval=4", "algo.group_size=4",
             "algo.t_mix=4", "sync.parity_every=2", "rollout.learner.init_sft_steps=20",
             "rollout.explorer.init_sft_steps=40", "algo.dynamic_sampling.enabled=true",
             "algo.dynamic_sampling.max_rounds=3", "reward.overlong.buffer_tokens=4",
             "reward.overlong.mask_truncated=true",
             "rollout.learner.sampling.max_new_tokens=16", "rollout.explorer.sampling.max_new_tokens=16"]
DYNAMIC = ("rounds", "groups_generated", "groups_informative", "groups_trained", "groups_filtered", "filtered_solved",
           "filtered_unsolved", "filtered_mixed", "filtered_explorer_only", "filtered_learner_only",
           "informative_via_explorer", "groups_surplus", "cap_hit", "extra_tokens/explorer", "extra_tokens/learner")
OVERLONG = ("truncated_frac", "penalized_frac", "penalty_mean")
# Step N's rounds run while step N-1 trains; the checkpoint of step 2 is saved before step 4's begin.
KILL_AT = r"^step ([4-9]|\d\d+) round [2-9]: "


def command(output_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "megatron_s2lpo.cli", "train", CONFIG, *OVERRIDES,
            f"run.output_dir={output_dir}", *extra]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dapo")
    run_ok(command(out), REPO_ROOT, timeout_s=300)
    return out


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_the_run_logs_dynamic_sampling_and_overlong_metrics(full_run: Path) -> None:
    records = read_metrics(str(full_run / "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(1, NUM_STEPS + 1))
    for r in records:
        for key in [f"dynamic/{k}" for k in DYNAMIC] + [f"overlong/{k}" for k in OVERLONG]:
            assert r[key] is not None, (r["step"], key)
        assert r["dynamic/groups_generated"] == 4 * r["dynamic/rounds"]  # 4 prompts per round
        assert r["dynamic/groups_informative"] + r["dynamic/groups_filtered"] == r["dynamic/groups_generated"]
        assert r["dynamic/groups_trained"] == (4 if not r["dynamic/cap_hit"] else
                                               r["dynamic/groups_informative"] or 4)
        trained_rows = r["dynamic/groups_trained"] * 4
        assert r["share/explorer"] * trained_rows == r["G_w"] * r["dynamic/groups_trained"]
        for source in ("explorer", "learner"):  # generated tokens count, trained on or not
            assert r[f"rollout_tokens/{source}"] >= r[f"dynamic/extra_tokens/{source}"]
    assert max(r["dynamic/rounds"] for r in records) > 1
    assert any(r["dynamic/extra_tokens/explorer"] > 0 for r in records)  # over-sampled explorer samples
    for source in ("explorer", "learner"):
        assert records[-1][f"cumulative/rollout_tokens/{source}"] == sum(r[f"rollout_tokens/{source}"] for r in records)
    assert any(r["eval/avg_at_k"] is not None for r in records if "eval/avg_at_k" in r)
    checkpoint = full_run / "checkpoints" / "step_00000004"
    assert (checkpoint / PENDING_FILE).is_file() and (checkpoint / PENDING_STATS_FILE).is_file()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_kill_while_a_step_over_samples_resumes_exactly(full_run: Path, tmp_path: Path) -> None:
    expected = [without_timing(r) for r in read_metrics(str(full_run / "metrics.jsonl"))]
    over_sampled = [r["step"] for r in expected if r["step"] >= 4 and r["dynamic/rounds"] > 1]
    assert over_sampled, "the reference run has no step >= 4 that over-samples: nothing to kill in"
    out = tmp_path / "killed"
    out.mkdir()
    shutil.copytree(full_run / "models", out / "models")
    line, _ = kill_on_output(command(out), REPO_ROOT, KILL_AT, timeout_s=300)
    killed_step = int(re.match(r"step (\d+)", line).group(1))
    assert killed_step == over_sampled[0]
    logged = [r["step"] for r in read_metrics(str(out / "metrics.jsonl"))]
    assert logged == list(range(1, len(logged) + 1)) and len(logged) < killed_step  # it never trained that step
    newest = 2 * ((killed_step - 2) // 2)  # saved once step newest + 1's rounds were done
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{newest:08d}"
    run_ok(command(out, "--resume"), REPO_ROOT, timeout_s=300)
    resumed = [without_timing(r) for r in read_metrics(str(out / "metrics.jsonl"))]
    assert [r["step"] for r in resumed] == list(range(1, NUM_STEPS + 1))
    for want, got in zip(expected, resumed):
        assert got == want, f"step {want['step']} differs after the kill"
