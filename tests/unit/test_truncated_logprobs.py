"""The learner's log-probs under the engine's top-k / top-p (learner.logprobs.kept_support and
chunked_logprobs(truncation=...)), against a float64 per-row reference, and against what the
in-process engine (SGLang's sampling rules) actually samples from. TP=2 runs in tests/distributed
(topk_checks.py, truncated_logprobs_tp2_equal_tp1).
"""

from __future__ import annotations

import pytest
import torch

from megatron_s2lpo.config.model import ModelArch
from megatron_s2lpo.learner.logprobs import chunked_logprobs
from megatron_s2lpo.rollout.engine import GenerateRequest
from megatron_s2lpo.rollout.local import LocalEngine

pytestmark = pytest.mark.usefixtures("one_thread")


def reference(logits: torch.Tensor, targets: torch.Tensor, top_k: int, top_p: float, temperature: float):
    """Row by row in float64: sort, keep rank < top_k and mass-before <= top_p (and the target),
    renormalise. Returns (log q(target), entropy of q, log kept mass), differentiable."""
    out_lp, out_ent, out_mass = [], [], []
    for row, target in zip(logits, targets):
        p = torch.softmax(row.double() / temperature, dim=-1)
        order = torch.argsort(p.detach(), descending=True)
        keep = torch.zeros_like(p, dtype=torch.bool)
        before = 0.0
        for rank, j in enumerate(order.tolist()):
            if (top_k < 1 or rank < top_k) and before <= top_p:
                keep[j] = True
            before += float(p[j].detach())
        keep[target] = True
        z = torch.where(keep, row.double() / temperature, torch.full_like(p, -torch.inf))
        logq = torch.log_softmax(z, dim=-1)
        out_lp.append(logq[target])
        q = logq.exp()
        out_ent.append(-(q[keep] * logq[keep]).sum())
        out_mass.append(p[keep].sum().log())
    return torch.stack(out_lp), torch.stack(out_ent), torch.stack(out_mass)


@pytest.mark.parametrize("top_k,top_p", [(-1, 0.8), (5, 1.0), (8, 0.7), (-1, 0.3)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_truncated_values_and_gradients_equal_the_reference(top_k, top_p, temperature):
    gen = torch.Generator().manual_seed(top_k + int(top_p * 10))
    vocab, padded, n = 40, 48, 17
    logits = torch.randn(n, padded, generator=gen) * 2.5
    logits[:, vocab:] = 30.0  # TP padding columns: never kept, never probable
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[0] = logits[0, :vocab].argmin()  # a token far outside the kept set: renormalised with it
    upstream = torch.randn(n, generator=gen)

    x = logits.clone().requires_grad_(True)
    masses: list = []
    lp, ent, _ = chunked_logprobs(x, torch.arange(n), targets, lambda h: h, vocab_size=vocab, temperature=temperature,
                                  with_entropy=True, chunk_tokens=5, truncation=(top_k, top_p), kept_mass=masses)
    ((lp * upstream).sum() + ent.sum()).backward()
    xr = logits[:, :vocab].double().clone().requires_grad_(True)
    lp_ref, ent_ref, mass_ref = reference(xr, targets, top_k, top_p, temperature)
    ((lp_ref * upstream.double()).sum() + ent_ref.sum()).backward()

    torch.testing.assert_close(lp.double(), lp_ref.detach(), atol=2e-5, rtol=0)
    torch.testing.assert_close(ent.double(), ent_ref.detach(), atol=2e-5, rtol=0)
    torch.testing.assert_close(torch.cat(masses).double(), mass_ref.detach(), atol=2e-5, rtol=0)
    torch.testing.assert_close(x.grad[:, :vocab].double(), xr.grad, atol=2e-5, rtol=0)
    assert bool((x.grad[:, vocab:] == 0).all())
    assert bool(torch.isfinite(lp).all())
    full, _, _ = chunked_logprobs(logits, torch.arange(n), targets, lambda h: h, vocab_size=vocab,
                                  temperature=temperature)
    lp = lp.detach()
    assert bool((lp >= full - 1e-6).all()) and float((lp - full).max()) > 1e-3  # renormalised: larger


def test_the_truncated_learner_matches_what_the_engine_samples():
    """An engine sampling at top_p 0.8 reports full-vocabulary log-probs (SGLang 0.5.23's
    sampler.py: log(probs) of the untruncated softmax). The learner (same weights) under the same
    truncation gives log(p / Z); the trainer subtracts log Z from the behaviour log-probs, so
    their ratio is exactly 1 again, whereas the untruncated ratio is off by the kept mass Z."""
    arch = ModelArch(family="qwen3", vocab_size=64, hidden_size=32, ffn_hidden_size=64, num_layers=1,
                     num_attention_heads=4, num_query_groups=2, head_dim=8, qk_layernorm=True)
    engine = LocalEngine.from_arch(arch, init_seed=3)
    with torch.no_grad():  # a peaked model, like a trained one, so top-p cuts a real tail
        engine.model.lm_head.weight.mul_(6.0)
    top_p, temperature = 0.8, 1.0
    reqs = [GenerateRequest(request_id=f"r{i}", prompt_ids=[1, 2 + i, 3], max_new_tokens=12, temperature=temperature,
                            top_p=top_p, seed=i) for i in range(8)]
    comps = engine.generate(reqs)
    logits, targets, behaviour = [], [], []
    with torch.no_grad():
        for c in comps:
            ids = torch.tensor([c.prompt_ids + c.token_ids])
            out = engine.model(input_ids=ids).logits[0]  # (L, V)
            start = len(c.prompt_ids) - 1
            logits.append(out[start:start + len(c.token_ids)])
            targets += c.token_ids
            behaviour += c.logprobs
    logits, targets, behaviour = torch.cat(logits), torch.tensor(targets), torch.tensor(behaviour)
    masses: list = []
    trunc, _, _ = chunked_logprobs(logits, torch.arange(len(targets)), targets, lambda h: h, vocab_size=64,
                                   temperature=temperature, truncation=(-1, top_p), kept_mass=masses)
    full, _, _ = chunked_logprobs(logits, torch.arange(len(targets)), targets, lambda h: h, vocab_size=64,
                                  temperature=temperature)
    log_mass = torch.cat(masses)
    torch.testing.assert_close(full, behaviour, atol=1e-5, rtol=0)  # the engine reports the full log-prob
    torch.testing.assert_close(trunc, behaviour - log_mass, atol=1e-5, rtol=0)  # adjusted: ratio exactly 1
    kept = float(log_mass.exp().mean())
    assert 0.5 < kept < 0.95  # without the adjustment the ratio old_trunc / behaviour is 1 / Z, not 1
    assert float((trunc - behaviour).exp().mean()) > 1.05


@pytest.mark.parametrize("sampling", [["rollout.learner.sampling.top_p=0.8"], ["rollout.learner.sampling.top_k=20"]])
def test_on_policy_distillation_refuses_a_truncating_sampler(sampling):
    """The teacher scores full-vocabulary log-probs, so opd's reverse KL needs an untruncated sampler."""
    from megatron_s2lpo.config import config_from_dict

    base = ["algo.method=opd", "rollout.teacher.model_path=/t"]
    config_from_dict({}, base)  # untruncated: accepted
    with pytest.raises(ValueError, match=r"algo\.method=opd with rollout\.learner\.sampling top_p=.* set top_p=1"):
        config_from_dict({}, base + sampling)
