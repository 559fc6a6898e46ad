"""Real SGLang 0.5.23 servers launched by the project's engine: generation and log-probs."""

from __future__ import annotations

import pytest
import torch

from megatron_s2lpo.rollout import GenerateRequest, LocalEngine
from megatron_s2lpo.types import FinishReason

pytestmark = pytest.mark.slow


def teacher_forced(model, comp, temperature: float) -> list[float]:
    """log_softmax(logits / T)[token] of a Hugging Face forward over prompt + completion (float64)."""
    ids = torch.tensor([comp.prompt_ids + comp.token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double() / temperature, dim=-1)
    start = len(comp.prompt_ids) - 1
    return [logp[start + i, t].item() for i, t in enumerate(comp.token_ids)]


def test_both_replicas_generate_with_the_log_probs_of_their_model(learner_pool, model_dirs, tok):
    """Each real replica answers with log-probs equal to a Hugging Face recomputation."""
    reference = LocalEngine.from_pretrained(model_dirs["learner"]).model
    assert learner_pool.replica_versions() == {"learner[0]": 0, "learner[1]": 0}
    for index in range(2):
        view = learner_pool.replica_engine(index)
        reqs = [GenerateRequest(request_id=f"smoke-{index}-{i}", prompt_ids=tok.encode(p), temperature=t,
                                max_new_tokens=8)
                for i, (p, t) in enumerate([("1+2=", 0.7), ("3-4=", 1.0), ("9", 1.3)])]
        for req, comp in zip(reqs, view.generate(reqs), strict=True):
            assert comp.request_id == req.request_id and comp.weight_version == 0
            assert comp.finish_reason in (FinishReason.STOP, FinishReason.LENGTH) and comp.token_ids
            ref = teacher_forced(reference, comp, req.temperature)
            assert max(abs(a - b) for a, b in zip(ref, comp.logprobs, strict=True)) < 1e-4


def raw_post(url: str, path: str, body: bytes | None, content_type: str | None) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url + path, data=body, method="POST")
    if content_type is not None:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.read().decode()


def test_the_rules_our_stand_ins_follow_hold_on_the_real_server(fresh_learner_pool, model_dirs):
    """What tests/protocol_server.py and the contract backend reproduce, judged by SGLang itself."""
    import json

    url = fresh_learner_pool.urls[0]
    body = json.dumps({"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 2}}).encode()
    status, answer = raw_post(url, "/generate", body, "application/x-www-form-urlencoded")
    assert status == 400 and "GenerateReqInput" in answer  # a valid body without the JSON content type
    assert raw_post(url, "/generate", body, None)[0] == 400
    assert raw_post(url, "/generate", body, "application/json")[0] == 200
    assert raw_post(url, "/flush_cache", None, None)[0] == 200  # a POST without a body is fine
    # an unknown top-level field is ignored: the misspelled version does not reach the server
    status, answer = raw_post(url, "/update_weights_from_disk", json.dumps(
        {"model_path": model_dirs["learner"], "weight_verison": "5"}).encode(), "application/json")
    assert status == 200 and json.loads(answer)["success"], answer
    assert fresh_learner_pool.replica_versions()["learner[0]"] == 0
    status, answer = raw_post(url, "/generate", json.dumps(
        {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2}, "return_logprb": True}).encode(),
        "application/json")
    assert status == 200 and "output_token_logprobs" not in json.loads(answer)["meta_info"]
    # ... but an unknown sampling parameter is refused, named
    status, answer = raw_post(url, "/generate", json.dumps(
        {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2, "temprature": 0.5}}).encode(),
        "application/json")
    assert status == 400 and "temprature" in answer
