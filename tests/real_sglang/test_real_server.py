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
