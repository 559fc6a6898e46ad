"""Truncated sampling on the real SGLang 0.5.23 server: what it samples from and what it reports.

The learner's behaviour-matching log-probs under `top_p` < 1 / `top_k` > 0 (docs/training.md,
"Truncated sampling") rest on two rules of SGLang's sampler, checked here on the real server:
  - it samples only from the kept set of its torch sampler (sorted descending, rank < top_k, mass
    before the token <= top_p), the set `rollout.local.support_mask` and the learner's
    `kept_support` compute;
  - it reports the FULL-vocabulary log-prob of the sampled token (log softmax(logits / T)), not
    the renormalised one, so the trainer subtracts the learner's log kept mass from it.
"""

from __future__ import annotations

import pytest
import torch

from megatron_s2lpo.learner.logprobs import chunked_logprobs
from megatron_s2lpo.rollout import GenerateRequest, LocalEngine
from megatron_s2lpo.rollout.local import support_mask

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("top_k,top_p", [(-1, 0.3), (5, 1.0)])
def test_the_real_server_samples_the_kept_set_and_reports_full_log_probs(fresh_learner_pool, model_dirs, tok,
                                                                          top_k, top_p):
    model = LocalEngine.from_pretrained(model_dirs["learner"]).model
    temperature, vocab = 1.0, len(tok)
    reqs = [GenerateRequest(request_id=f"trunc-{top_k}-{i}", prompt_ids=tok.encode(p), temperature=temperature,
                            top_k=top_k, top_p=top_p, max_new_tokens=10, seed=i)
            for i, p in enumerate(["1+2=", "3-4=", "9", "7+7=", "5"])]
    logits, targets, behaviour = [], [], []
    for comp in fresh_learner_pool.generate(reqs):
        ids = torch.tensor([comp.prompt_ids + comp.token_ids])
        with torch.no_grad():
            out = model(input_ids=ids).logits[0].float()
        start = len(comp.prompt_ids) - 1
        logits.append(out[start:start + len(comp.token_ids), :vocab])
        targets += comp.token_ids
        behaviour += comp.logprobs
    logits, targets, behaviour = torch.cat(logits), torch.tensor(targets), torch.tensor(behaviour, dtype=torch.float32)
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    n = len(targets)
    assert n >= 20

    # 1. every sampled token is in the kept set (a tie at the cut-off counts as kept)
    k = torch.full((n,), vocab if top_k < 1 else top_k)
    allowed = support_mask(probs, k, torch.full((n,), top_p + 1e-4, dtype=torch.float64))
    if top_k > 0:
        kth = probs.topk(top_k, dim=-1).values[:, -1:]
        allowed = probs >= kth - 1e-6
    assert bool(allowed.gather(-1, targets[:, None]).all()), "the server sampled outside the top-k / top-p set"
    kept = support_mask(probs, k, torch.full((n,), top_p, dtype=torch.float64))
    assert float(kept.sum(-1).double().mean()) < 0.5 * vocab  # the truncation is real on this model

    # 2. the reported log-prob is the full-vocabulary one, off the renormalised one by the kept mass
    full, _, _ = chunked_logprobs(logits, torch.arange(n), targets, lambda h: h, vocab_size=vocab,
                                  temperature=temperature)
    masses: list = []
    trunc, _, _ = chunked_logprobs(logits, torch.arange(n), targets, lambda h: h, vocab_size=vocab,
                                   temperature=temperature, truncation=(top_k, top_p), kept_mass=masses)
    log_mass = torch.cat(masses)
    assert float((full - behaviour).abs().max()) < 1e-4
    assert float((trunc - (behaviour - log_mass)).abs().max()) < 1e-4  # what the trainer compares: ratio 1
    assert float(log_mass.exp().mean()) < 0.9  # unadjusted, the ratio would be 1 / kept mass
