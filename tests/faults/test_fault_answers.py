"""What peers hand the trainer, and what the trainer hands them.

- Impossible answers, whoever produced them: an SGLang answer with a float token id (int() would
  truncate 7.9 to token 7) or a log-prob above 0 (+50 zeroes the step's gradient through the
  importance weights), an explorer store record with such values, a pending-rollouts file with a
  column of the wrong type: each refused, naming the value.
- The API key: never in the run's files (server logs included: the SGLang-protocol stand-in prints
  its arguments at start-up as SGLang 0.5.23 does), the logged launch command or an error message.
- The trainer's rendezvous store: on one machine nothing of the trainer listens on every interface
  (checked on the real sockets of a process that initialised the learner's process group).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from fault_runs import REPO_ROOT, RUN_TIMEOUT_S, command, copy_run, metrics

from megatron_s2lpo.config.rollout import SamplingConfig
from megatron_s2lpo.rollout.collector import GroupCollector
from megatron_s2lpo.rollout.engine import Completion, GenerateRequest
from megatron_s2lpo.rollout.explorer import ExplorerPrefetcher
from megatron_s2lpo.rollout.sglang_client import EngineRequestError, parse_generate_output
from megatron_s2lpo.rollout.store import ExplorerSample, StoreReader, StoreWriter
from megatron_s2lpo.rollout.validation import AnswerRules, InvalidAnswerError
from megatron_s2lpo.types import FinishReason, Prompt

SAMPLING = SamplingConfig(temperature=1.0, max_new_tokens=4)
PROMPT = Prompt(prompt_id="p0", text="1+1=", ground_truth="2", token_ids=[5, 6, 7])


def sglang_answer(req: GenerateRequest, ids: list, logprobs: list) -> dict:
    return {"text": "x", "output_ids": ids, "meta_info": {
        "id": req.request_id, "finish_reason": {"type": "stop"}, "weight_version": "0",
        "output_token_logprobs": [[lp, t, None] for lp, t in zip(logprobs, ids)]}}


@pytest.mark.parametrize("ids", [[3, 7.9, 2], [3, 7.0, 2], [3, "7", 2], [3, True, 2]])
def test_an_sglang_answer_with_a_token_id_that_is_not_an_integer_is_refused(ids) -> None:
    req = GenerateRequest.from_sampling("r0", [1, 2], SAMPLING)
    with pytest.raises(EngineRequestError, match="integer token ids"):
        parse_generate_output(sglang_answer(req, ids, [-0.1] * 3), req, url="http://127.0.0.1:1")


class FixedEngine:
    """An engine that answers every request with the same tokens and log-probs."""

    def __init__(self, ids: list, logprobs: list) -> None:
        self.ids, self.logprobs = ids, logprobs

    def generate(self, requests: list[GenerateRequest]) -> list[Completion]:
        return [Completion(request_id=r.request_id, prompt_ids=list(r.prompt_ids), token_ids=list(self.ids), text="x",
                           logprobs=list(self.logprobs), finish_reason=FinishReason.STOP, weight_version=0)
                for r in requests]

    def close(self) -> None:
        pass


@pytest.mark.parametrize("logprob, message", [(50.0, "above 0"), (float("nan"), "not finite"),
                                               (1e-2, "above 0")])
def test_a_learner_answer_with_an_impossible_log_prob_is_refused(logprob, message) -> None:
    collector = GroupCollector(learner=FixedEngine([3, 4], [-0.5, logprob]), sampling=SAMPLING, group_size=2,
                               t_mix=0, rules=AnswerRules(vocab_size=100))
    try:
        with pytest.raises(InvalidAnswerError, match=f"log-prob .* at position 1 .*{message}"):
            collector.collect([PROMPT], step=1)
    finally:
        collector.close()


@pytest.mark.parametrize("field, value, message", [("response_ids", [3, 4.5], "is not an integer"),
                                                   ("response_logprobs", [-0.5, 50.0], "above 0")])
def test_an_explorer_store_record_with_impossible_values_is_refused(tmp_path: Path, field, value, message) -> None:
    sample = ExplorerSample(prompt_id="p0", sample_index=0, prompt_ids=[5, 6, 7], response_ids=[3, 4],
                            response_logprobs=[-0.5, -0.25], finish_reason=FinishReason.STOP, text="x")
    with StoreWriter(str(tmp_path)) as writer:
        writer.append(sample)
    shard = next(tmp_path.glob("shard-*.jsonl"))
    record = json.loads(shard.read_text())
    record[field] = value
    shard.write_text(json.dumps(record) + "\n")
    for index in tmp_path.glob("*.index.json"):
        index.unlink()  # the index would point at the old byte range
    prefetcher = ExplorerPrefetcher(reader=StoreReader(str(tmp_path)))
    collector = GroupCollector(learner=FixedEngine([3], [-0.1]), sampling=SAMPLING, group_size=1, t_mix=2,
                               prefetcher=prefetcher, rules=AnswerRules(vocab_size=100))
    try:
        with pytest.raises(InvalidAnswerError, match=f"explorer engine answer for prompt 'p0'.*{message}"):
            collector.collect([PROMPT], step=1)
    finally:
        collector.close()
        prefetcher.close()


def test_a_pending_rollouts_file_with_float_token_ids_is_refused() -> None:
    from safetensors.torch import load, save

    from megatron_s2lpo.trainer.pipeline import decode_groups, encode_groups
    from megatron_s2lpo.types import Group, Rollout, Source

    rollout = Rollout(prompt_id="p0", sample_index=0, source=Source.EXPLORER, prompt_ids=[5, 6, 7],
                      response_ids=[3, 4], response_logprobs=[-0.5, -0.25], finish_reason=FinishReason.STOP,
                      weight_version=0, text="x", reward=1.0)
    data = encode_groups(2, [Group(prompt=PROMPT, rollouts=[rollout])], 0.1, 0.1)
    tensors = load(data)
    tensors["response_ids"] = tensors["response_ids"].to(torch.float64) + 0.5
    with pytest.raises(ValueError, match="f is damaged .*response_ids is torch.float64"):
        decode_groups(save(tensors), {"p0": PROMPT}, where="f")


LISTENERS = textwrap.dedent("""
    import json, psutil
    from megatron_s2lpo.learner.parallel import destroy_parallel, init_parallel

    init_parallel(1, 1)
    me = psutil.Process()
    print(json.dumps(sorted({c.laddr.ip for c in me.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN})))
    destroy_parallel()
""")


@pytest.mark.timeout(300)
def test_the_trainers_process_group_listens_on_no_public_interface() -> None:
    proc = subprocess.run([sys.executable, "-c", LISTENERS], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    addresses = json.loads(proc.stdout.strip().splitlines()[-1])
    wildcard = [a for a in addresses if a in ("0.0.0.0", "::")]
    assert not wildcard, f"listening on every interface: {addresses}"


def test_a_server_command_is_logged_and_described_without_its_key(tmp_path: Path) -> None:
    """A launched server's log and description, and what it prints (its arguments, as SGLang
    does), hold no key; the server itself received the key it was given."""
    from megatron_s2lpo.rollout.sglang_server import ServerProcess

    key = "sk-" + hashlib.sha256(b"fault tier").hexdigest()[:24]
    script = tmp_path / "server.py"
    script.write_text(textwrap.dedent("""
        import hashlib, sys
        print("server_args=", sys.argv, flush=True)  # what SGLang 0.5.23 logs at start-up
        key = sys.argv[sys.argv.index("--api-key") + 1]
        print("key digest", hashlib.sha256(key.encode()).hexdigest(), flush=True)
        sys.stderr.write(f"warning: {key[:10]}" + f"{key[10:]} in a line cut in two\\n")
    """))
    log = tmp_path / "logs" / "learner-0.log"
    server = ServerProcess([sys.executable, str(script), "--port", "1", "--api-key", key], log_path=str(log))
    server.start()
    server._proc.wait(60)
    text = log.read_text()
    assert key not in text and key not in server.describe()
    assert "--api-key <redacted>" in text and "<redacted>" in server.describe()
    assert f"key digest {hashlib.sha256(key.encode()).hexdigest()}" in text  # the server got the real key
    assert "warning: <redacted> in a line cut in two" in text
    assert server.exit_code() == 0


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_a_runs_files_and_errors_never_hold_the_api_key(reference, tmp_path: Path) -> None:
    """A run whose learner is a launched SGLang-protocol server with a key (it prints its arguments
    at start-up), then one whose server exits at once (the error quotes its command and log)."""
    from megatron_s2lpo.utils.ports import free_port

    key = "sk-" + hashlib.sha256(b"run key").hexdigest()[:24]
    run = copy_run(reference["sync"], tmp_path / "run", models_only=True)
    server = ["algo.t_mix=0", "rollout.learner.backend=sglang", f"rollout.learner.port={free_port()}",
              f"rollout.learner.api_key={key}", "rollout.learner.startup_timeout_s=200"]
    proc = subprocess.run(command(run, "run.num_steps=2", *server,
                                  f"rollout.learner.launch_command=[{sys.executable}, tests/protocol_server.py]"),
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [r["step"] for r in metrics(run)] == [1, 2]  # the server accepted the key
    assert "server_args=" in (run / "logs" / "learner-0.log").read_text()
    leaks = [str(p) for p in run.rglob("*") if p.is_file() and key.encode() in p.read_bytes()]
    assert not leaks and key not in proc.stdout + proc.stderr, leaks
    failing = copy_run(reference["sync"], tmp_path / "failing", models_only=True)
    exits = f"[{sys.executable}, -c, 'import sys; print(sys.argv); sys.exit(3)']"
    proc = subprocess.run(command(failing, "run.num_steps=1", *server, f"rollout.learner.launch_command={exits}"),
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode != 0 and "exited with code 3" in proc.stderr, proc.stderr[-3000:]
    assert key not in proc.stdout + proc.stderr
    leaks = [str(p) for p in failing.rglob("*") if p.is_file() and key.encode() in p.read_bytes()]
    assert not leaks
