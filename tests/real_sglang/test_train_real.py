"""`s2lpo train` with the learner AND the frozen explorer served by real SGLang 0.5.23 servers.

The tier's servers are attached (launched once by the project's engine, conftest.py): the
learner's two replicas receive the learner's weights after every step (disk transport, parity
every step, rotating over the live replicas), the explorer serves a frozen model whose log-probs
on fixed responses must be the same after the run as before. S2L-PO with t_mix annealing and PODS
on; then the same run with a learner replica SIGKILLed during step 2 (its requests rerouted to
the other replica: the metrics must equal the clean run's); the one-step off-policy pipeline
(run.max_staleness=1), and a resume while the attached learner holds a later weight version.

Comparable runs: the real server's sampler cannot be seeded on this path
(`sampling_seed` needs `--enable-deterministic-inference`, which SGLang refuses with the
torch-native attention the CPU profile uses), so two sampled runs never match. The clean and the
killed run therefore decode greedily: `sampling.top_k=1` at temperature 1, which SGLang 0.5.23
runs as greedy decoding (`is_all_greedy`) and for which it returns the untruncated log_softmax of
the logits, the learner's own log-probs at temperature 1 (checked by the parity check every
step). Greedy tokens depend on the weights only, not on which replica or batch served a request.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_s2lpo.rollout import GenerateRequest, LocalEngine, ScoreRequest, SGLangEngine
from megatron_s2lpo.rollout.sglang_client import EngineRequestError
from megatron_s2lpo.trainer.metrics import read_metrics

from conftest import real_engine_config
from test_real_server import teacher_forced

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
REPO_ROOT = Path(__file__).resolve().parents[2]
NUM_STEPS = 4
GREEDY = ["rollout.learner.sampling.top_k=1", "rollout.explorer.sampling.top_k=1"]
# Metrics two greedy runs share exactly (counts, rewards, tokens, versions); the others are floats
# computed from the same tokens (equal up to the last digits: the servers' log-probs of one token
# may differ in the 7th digit with the batch it was decoded in); time/ and parity/ differ anyway.
EXACT = ("step", "alpha", "G_w", "G_s", "weight_version", "reward/", "accuracy/", "pods/", "rollout_tokens/",
         "cumulative/rollout_tokens/", "response_len/", "share/", "sync/bytes", "sync/buckets", "sync/version")


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


@pytest.fixture(scope="module")
def greedy_run(learner_pool, explorer_server, model_dirs, tok, tmp_path_factory) -> dict:
    """The S2L-PO run, greedy (module docstring), and the explorer's log-probs around it."""
    learner_pool.update_weights_from_disk(model_dirs["learner"], 0)
    out = tmp_path_factory.mktemp("greedy") / "run"
    before = explorer_logprobs(explorer_server, tok)
    run(train_command(out, learner_pool, explorer_server, model_dirs, *GREEDY))
    result = {"records": read_metrics(str(out / "metrics.jsonl")), "versions": learner_pool.replica_versions(),
              "explorer_before": before, "explorer_after": explorer_logprobs(explorer_server, tok)}
    learner_pool.update_weights_from_disk(model_dirs["learner"], 0)
    return result


def test_s2lpo_run_on_real_learner_and_explorer_servers(greedy_run, explorer_server):
    records = greedy_run["records"]
    assert [r["step"] for r in records] == list(range(1, NUM_STEPS + 1))
    assert [r["alpha"] for r in records] == [1.0, 0.5, 0.0, 0.0]  # t_mix=3, linear
    assert records[0]["G_w"] > records[1]["G_w"] > 0 == records[2]["G_w"] == records[3]["G_w"]
    for r in records:
        assert r["weight_version"] == r["step"]
        assert r["parity/mean_abs_logp_diff"] < 1e-3, r  # every step, on replica (step - 1) mod 2
        assert r["pods/generated_learner"] + r["pods/generated_explorer"] == 6 * 4  # n per prompt
        assert r["pods/kept_learner"] + r["pods/kept_explorer"] == 4 * 4  # m per prompt
    assert any(r["train/grad_norm"] > 0 for r in records)  # explorer and learner answers differ: it learns
    assert greedy_run["versions"] == {"learner[0]": NUM_STEPS, "learner[1]": NUM_STEPS}
    # the frozen explorer: same weights (its log-probs on fixed responses) and version after the run
    before, after = greedy_run["explorer_before"], greedy_run["explorer_after"]
    assert max(abs(a - b) for x, y in zip(before, after, strict=True) for a, b in zip(x, y, strict=True)) < 1e-5
    assert explorer_server.replica_versions() == {"explorer[0]": 0}


def kill_group(process) -> None:
    """SIGKILL a launched server and its scheduler / detokenizer children (its process group)."""
    os.killpg(os.getpgid(process.pid), signal.SIGKILL)


def run_and_kill_replica_1(command: list[str], metrics: Path, pool, log_path: Path) -> tuple[str, bool]:
    """Run the trainer; SIGKILL the pool's replica 1 as soon as the run has logged step 1."""
    killed, deadline = False, time.monotonic() + 600
    with open(log_path, "w+") as log:
        proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                if not killed and metrics.is_file() and len(read_metrics(str(metrics))) >= 1:
                    kill_group(pool.replicas[1].process)  # step 1 logged: step 2 is generating
                    killed = True
                time.sleep(0.05)
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.seek(0)
        output = log.read()
    assert proc.returncode == 0, output[-6000:]
    return output, killed


def assert_same_metrics(clean: list[dict], faulty: list[dict]) -> None:
    assert [r["step"] for r in faulty] == [r["step"] for r in clean]
    for a, b in zip(clean, faulty, strict=True):
        for key, value in a.items():
            if key.startswith(("time/", "parity/")):
                continue
            if value is None or key.startswith(EXACT):  # None: no sample of that model this step
                assert b[key] == value, (a["step"], key, value, b[key])
            elif isinstance(value, float) and math.isnan(value):
                assert math.isnan(b[key]), (a["step"], key)
            else:
                assert math.isclose(b[key], value, rel_tol=1e-4, abs_tol=1e-6), (a["step"], key, value, b[key])


def test_a_learner_replica_killed_mid_step_is_rerouted_and_the_run_equals_the_clean_run(
        greedy_run, fresh_learner_pool, explorer_server, model_dirs, tok, tmp_path):
    """Replica 1 is SIGKILLed as step 2 starts generating: the run's engine (attached to both)
    reroutes its requests, leaves it out of the next weight updates and of the parity rotation,
    and finishes with the clean run's metrics. The same dead server as the ONLY attached replica
    of another engine: an error within unavailable_timeout_s naming it, never a hang. Then the
    tier's engine, which launched it, restarts it and replays its weights."""
    pool = fresh_learner_pool
    only = SGLangEngine(real_engine_config(url=pool.urls[1], unavailable_timeout_s=5.0, max_retries=1),
                        name="only", backoff_s=0.1)
    out = tmp_path / "run"
    try:
        assert only.generate([GenerateRequest(request_id="alive", prompt_ids=tok.encode("1+1="),
                                              max_new_tokens=4)])[0].weight_version == 0
        output, killed = run_and_kill_replica_1(train_command(out, pool, explorer_server, model_dirs, *GREEDY),
                                                out / "metrics.jsonl", pool, tmp_path / "train.log")
        assert killed, output[-6000:]
        assert f"replica learner[1] at {pool.urls[1]} does not answer /health" in output  # the kill hit the run
        assert_same_metrics(greedy_run["records"], read_metrics(str(out / "metrics.jsonl")))
        start = time.monotonic()
        with pytest.raises(EngineRequestError) as info:
            only.generate([GenerateRequest(request_id="dead", prompt_ids=tok.encode("1+1="), max_new_tokens=4)])
        assert time.monotonic() - start < 120
    finally:
        only.close()
    message = str(info.value)
    assert f"replica only[0] at {pool.urls[1]}" in message and "unavailable_timeout_s" in message
    assert "restart the attached server" in message
    restarts = pool.replicas[1].restarts
    pool.update_weights_from_disk(model_dirs["learner"], 0)  # the launched replica restarts on the way
    assert pool.replicas[1].restarts == restarts + 1 and pool.replica_versions() == {"learner[0]": 0,
                                                                                      "learner[1]": 0}
    reference = LocalEngine.from_pretrained(model_dirs["learner"]).model
    req = GenerateRequest(request_id="back", prompt_ids=tok.encode("2+2="), temperature=1.0, max_new_tokens=8)
    comp = pool.replica_engine(1).generate([req])[0]
    assert max(abs(a - b) for a, b in zip(teacher_forced(reference, comp, 1.0), comp.logprobs, strict=True)) < 1e-4


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
