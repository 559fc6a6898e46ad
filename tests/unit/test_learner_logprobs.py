"""Vocab-parallel log-probs / entropy at TP=1 against a float64 full-vocabulary reference.

The TP=2 case runs in tests/distributed (tp2 script); this file never imports megatron.
"""

import subprocess
import sys

import pytest
import torch

from megatron_s2lpo.learner.logprobs import token_logprobs, vocab_parallel_logprobs


def _reference(logits, tokens, vocab_size, temperature):
    """Slow obvious reference: float64 log_softmax over the real vocabulary, shifted by a loop."""
    z = logits[..., :vocab_size].double() / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    num_seqs, seq_len = tokens.shape
    logprobs = torch.zeros(num_seqs, seq_len, dtype=torch.float64)
    entropy = torch.zeros(num_seqs, seq_len, dtype=torch.float64)
    for b in range(num_seqs):
        for t in range(1, seq_len):
            logprobs[b, t] = logp_all[b, t - 1, tokens[b, t]]
            entropy[b, t] = -(logp_all[b, t - 1].exp() * logp_all[b, t - 1]).sum()
    return logprobs, entropy


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_gradients_match_full_vocab_reference(temperature):
    torch.manual_seed(0)
    vocab_size, padded = 37, 48
    logits = torch.randn(3, 6, padded) * 3
    logits[..., vocab_size:] = 50.0  # padding rows must never carry probability
    tokens = torch.randint(0, vocab_size, (3, 6))
    grad_lp, grad_ent = torch.randn(3, 6), torch.randn(3, 6)

    x = logits.clone().requires_grad_(True)
    lp, ent = token_logprobs(x, tokens, vocab_size=vocab_size, temperature=temperature, with_entropy=True)
    ((lp * grad_lp).sum() + (ent * grad_ent).sum()).backward()

    x_ref = logits.double().clone().requires_grad_(True)
    lp_ref, ent_ref = _reference(x_ref, tokens, vocab_size, temperature)
    ((lp_ref * grad_lp.double()).sum() + (ent_ref * grad_ent.double()).sum()).backward()

    assert lp.dtype == torch.float32 and lp.shape == (3, 6)
    torch.testing.assert_close(lp.double(), lp_ref.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(ent.double(), ent_ref.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.grad.double(), x_ref.grad, atol=1e-5, rtol=0)
    assert torch.all(x.grad[..., vocab_size:] == 0)
    assert torch.all(lp[:, 0] == 0) and torch.all(ent[:, 0] == 0)


def test_without_entropy_and_no_grad():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 16)
    tokens = torch.randint(0, 16, (2, 5))
    with torch.no_grad():
        lp, ent = token_logprobs(logits, tokens, vocab_size=16)
    assert ent is None
    ref, _ = _reference(logits, tokens, 16, 1.0)
    torch.testing.assert_close(lp.double(), ref, atol=1e-6, rtol=0)


def test_bf16_logits_get_fp32_math_and_bf16_grad():
    torch.manual_seed(2)
    logits = torch.randn(2, 4, 16).bfloat16().requires_grad_(True)
    tokens = torch.randint(0, 16, (2, 4))
    lp, _ = token_logprobs(logits, tokens, vocab_size=16)
    lp.sum().backward()
    assert lp.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    ref, _ = _reference(logits.detach().float(), tokens, 16, 1.0)
    torch.testing.assert_close(lp.double(), ref, atol=1e-5, rtol=0)


def test_clear_errors():
    logits = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_logprobs(logits, torch.zeros(2, 4, dtype=torch.long), vocab_size=8, temperature=0.0)
    with pytest.raises(ValueError, match="target"):
        vocab_parallel_logprobs(logits, torch.zeros(2, 3, dtype=torch.long), vocab_size=8)
    with pytest.raises(ValueError, match="B, T, V_local"):
        token_logprobs(logits, torch.zeros(2, 5, dtype=torch.long), vocab_size=8)


def test_learner_package_does_not_import_megatron():
    code = ("import sys, megatron_s2lpo.learner, megatron_s2lpo.learner.logprobs, "
            "megatron_s2lpo.learner.batching, megatron_s2lpo.learner.checkpoint, megatron_s2lpo.learner.cpu_shims, "
            "megatron_s2lpo.config.learner; "
            "assert not any(m.startswith('megatron.') or m == 'megatron' for m in sys.modules), "
            "[m for m in sys.modules if m.startswith('megatron.')]")
    subprocess.run([sys.executable, "-c", code], check=True)
