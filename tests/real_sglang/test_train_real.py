"""`s2lpo train` with the learner AND the frozen explorer served by real SGLang 0.5.23 servers.

The tier's servers are attached (launched once by the project's engine, conftest.py): the
learner's two replicas receive the learner's weights after every step (disk transport, parity
every step, rotating over both), the explorer serves a frozen model whose log-probs on fixed
responses must be the same after the run as before. S2L-PO with t_mix annealing and PODS on;
then the one-step off-policy pipeline (run.max_staleness=1), and a resume while the attached
learner holds a later weight version than the checkpoint.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_s2lpo.rollout import ScoreRequest
from megatron_s2lpo.trainer.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
REPO_ROOT = Path(__file__).resolve().parents[2]
NUM_STEPS = 4


def train_command(out: Path, learner_pool, explorer_server, model_dirs, *extra: str) -> list[str]:
    return [sys.executable, "-m", "megatron_s2lpo.cli", "train", str(REPO_ROOT / "examples" / "tiny_cpu.yaml"),
            "rollout.learner.backend=sglang", f"rollout.learner.urls={json.dumps(learner_pool.urls)}",
            f"rollout.learner.model_path={model_dirs['learner']}", "rollout.learner.request_timeout_s=120",
            "rollout.explorer.backend=sglang", f"rollout.explorer.url={explorer_server.url}",
            f"rollout.explorer.model_path={model_dirs['explorer']}",
            f"run.num_steps={NUM_STEPS}", "run.eval_every=0", "run.save_every=0", f"run.output_dir={out}",
            "run.reward_workers=1", "data.prompts_per_step=4", "algo.group_size=4", "algo.pods.n=6",
            "algo.pods.m=4", "algo.t_mix=3", "algo.mini_batches_per_step=1", "sync.parity_every=1", *extra]


def run(command: list[str], timeout_s: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def explorer_logprobs(explorer_server, tok) -> list[list[float]]:
    """The explorer's log-probs of fixed responses to fixed prompts (prefill scoring: no sampling)."""
    requests = [ScoreRequest(request_id=f"fixed-{i}", prompt_ids=tok.encode(p), response_ids=tok.encode(r))
                for i, (p, r) in enumerate([("3+4=", "\\boxed{7}"), ("9-5=", "\\boxed{4}"), ("1+1=", "2")])]
    return [s.logprobs for s in explorer_server.score(requests)]


def test_s2lpo_run_on_real_learner_and_explorer_servers(fresh_learner_pool, explorer_server, model_dirs, tok,
                                                        tmp_path):
    before = explorer_logprobs(explorer_server, tok)
    run(train_command(tmp_path / "run", fresh_learner_pool, explorer_server, model_dirs))
    records = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(1, NUM_STEPS + 1))
    assert [r["alpha"] for r in records] == [1.0, 0.5, 0.0, 0.0]  # t_mix=3, linear
    assert records[0]["G_w"] > records[1]["G_w"] > 0 == records[2]["G_w"] == records[3]["G_w"]
    for r in records:
        assert r["weight_version"] == r["step"]
        assert r["parity/mean_abs_logp_diff"] < 1e-3, r  # every step, on replica (step - 1) mod 2
        assert r["pods/generated_learner"] + r["pods/generated_explorer"] == 6 * 4  # n per prompt
        assert r["pods/kept_learner"] + r["pods/kept_explorer"] == 4 * 4  # m per prompt
    assert fresh_learner_pool.replica_versions() == {"learner[0]": NUM_STEPS, "learner[1]": NUM_STEPS}
    # the frozen explorer: same weights (its log-probs on fixed responses) and version after the run
    after = explorer_logprobs(explorer_server, tok)  # (a cached prefix may change the last digits only)
    assert max(abs(a - b) for x, y in zip(before, after, strict=True) for a, b in zip(x, y, strict=True)) < 1e-5
    assert explorer_server.replica_versions() == {"explorer[0]": 0}


def test_one_step_off_policy_pipeline_on_real_servers(fresh_learner_pool, explorer_server, model_dirs, tmp_path):
    """Step i+1 is generated while step i trains and syncs: the sync pauses generation (abort mode)
    on both replicas and the aborted requests are resubmitted; every sample is one version behind."""
    run(train_command(tmp_path / "run", fresh_learner_pool, explorer_server, model_dirs, "run.max_staleness=1"))
    records = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(1, NUM_STEPS + 1))
    for r in records:
        assert r["parity/mean_abs_logp_diff"] < 1e-3, r
        if r["G_s"]:
            assert r["staleness/max"] <= 1.0
    assert any(r["staleness/max"] == 1.0 for r in records[1:])
    assert fresh_learner_pool.replica_versions() == {"learner[0]": NUM_STEPS, "learner[1]": NUM_STEPS}


def test_resume_while_the_attached_learner_holds_a_later_version(fresh_learner_pool, explorer_server, model_dirs,
                                                                 tmp_path):
    """A run checkpointed at step 2 whose attached servers went on to version 7 (another run, or
    this one past its last checkpoint): the resume pushes the checkpoint's weights as version 2."""
    out = tmp_path / "run"
    command = train_command(out, fresh_learner_pool, explorer_server, model_dirs, "run.save_every=1")
    run([*command, "run.num_steps=2"])
    fresh_learner_pool.update_weights_from_disk(model_dirs["learner_alt"], 7)  # later, other weights
    run([*command, "run.num_steps=3", "--resume"])
    records = read_metrics(str(out / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[2]["weight_version"] == 3 and records[2]["parity/mean_abs_logp_diff"] < 1e-3
    assert fresh_learner_pool.replica_versions() == {"learner[0]": 3, "learner[1]": 3}
