"""Log-probs at K given ids (distillation top-k targets) at TP=1 against a float64 full-vocab reference.

Covers `vocab_parallel_logprobs_at` and `token_topk_logprobs`: values, gradients w.r.t. the
logits, padded vocabulary columns, temperature, repeated ids, dtypes, errors. The TP=2 vocab
split runs in tests/distributed/test_topk_logprobs.py; this file never imports megatron.
"""

import pytest
import torch

from megatron_s2lpo.learner.logprobs import token_logprobs, token_topk_logprobs, vocab_parallel_logprobs_at


def _reference_at(logits, ids, vocab_size, temperature):
    """Slow obvious reference: float64 log_softmax over the real vocabulary, looked up by a loop."""
    logp_all = torch.log_softmax(logits[..., :vocab_size].double() / temperature, dim=-1)
    flat_logp, flat_ids = logp_all.reshape(-1, vocab_size), ids.reshape(-1, ids.shape[-1])
    rows = [torch.stack([flat_logp[i, j] for j in flat_ids[i].tolist()]) for i in range(flat_ids.shape[0])]
    return torch.stack(rows).reshape(ids.shape)


def _reference_token_topk(logits, topk_ids, vocab_size, temperature):
    """Entry [b, t, k]: log p(topk_ids[b, t, k]) under the logits at t - 1; 0 at t = 0."""
    num_seqs, seq_len, num_k = topk_ids.shape
    logp_all = torch.log_softmax(logits[..., :vocab_size].double() / temperature, dim=-1)
    out = [[torch.zeros(num_k, dtype=torch.float64)] for _ in range(num_seqs)]
    for b in range(num_seqs):
        for t in range(1, seq_len):
            out[b].append(torch.stack([logp_all[b, t - 1, i] for i in topk_ids[b, t].tolist()]))
    return torch.stack([torch.stack(row) for row in out])


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_and_gradients_match_reference(temperature, dtype):
    torch.manual_seed(0)
    vocab_size, padded, num_k = 37, 48, 5
    logits = (torch.randn(2, 3, padded, dtype=torch.float64) * 3).to(dtype)
    logits[..., vocab_size:] = 50.0  # padding must never carry probability
    ids = torch.randint(0, vocab_size, (2, 3, num_k))
    ids[0, 0, 1] = ids[0, 0, 0]  # a repeated id gets the sum of both upstream gradients
    upstream = torch.randn(2, 3, num_k, dtype=torch.float64)

    x = logits.clone().requires_grad_(True)
    lp = vocab_parallel_logprobs_at(x, ids, vocab_size=vocab_size, temperature=temperature)
    (lp * upstream.to(lp.dtype)).sum().backward()
    x_ref = logits.double().clone().requires_grad_(True)
    lp_ref = _reference_at(x_ref, ids, vocab_size, temperature)
    (lp_ref * upstream).sum().backward()

    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert lp.dtype == dtype and lp.shape == (2, 3, num_k)
    torch.testing.assert_close(lp.double(), lp_ref.detach(), atol=tol, rtol=0)
    torch.testing.assert_close(x.grad.double(), x_ref.grad, atol=tol, rtol=0)
    assert torch.all(x.grad[..., vocab_size:] == 0)


def test_token_topk_alignment_and_gradients():
    torch.manual_seed(1)
    vocab_size, padded, num_k, temperature = 29, 32, 4, 0.8
    logits = torch.randn(3, 7, padded, dtype=torch.float64) * 2
    logits[..., vocab_size:] = 40.0
    topk_ids = torch.randint(0, vocab_size, (3, 7, num_k))
    upstream = torch.randn(3, 7, num_k, dtype=torch.float64)

    x = logits.clone().requires_grad_(True)
    lp = token_topk_logprobs(x, topk_ids, vocab_size=vocab_size, temperature=temperature)
    (lp * upstream).sum().backward()
    x_ref = logits.clone().requires_grad_(True)
    lp_ref = _reference_token_topk(x_ref, topk_ids, vocab_size, temperature)
    (lp_ref * upstream).sum().backward()

    assert lp.shape == (3, 7, num_k) and torch.all(lp[:, 0] == 0)
    torch.testing.assert_close(lp, lp_ref.detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-12, rtol=0)
    # The last position predicts nothing inside the sequence: its logits get no gradient.
    assert torch.all(x.grad[:, -1] == 0) and torch.all(x.grad[..., vocab_size:] == 0)


def test_single_id_equals_token_logprobs():
    torch.manual_seed(2)
    logits = torch.randn(2, 6, 24)
    tokens = torch.randint(0, 20, (2, 6))
    expected, _ = token_logprobs(logits, tokens, vocab_size=20, temperature=0.9)
    got = token_topk_logprobs(logits, tokens.unsqueeze(-1), vocab_size=20, temperature=0.9)
    torch.testing.assert_close(got.squeeze(-1), expected, atol=1e-6, rtol=0)


def test_full_vocab_ids_sum_to_one():
    """K = V ids: the probabilities are the whole softmax, so they sum to 1 at every position."""
    torch.manual_seed(3)
    logits = torch.randn(2, 4, 16, dtype=torch.float64) * 5
    ids = torch.argsort(torch.rand(2, 4, 13), dim=-1)  # every real id once, shuffled
    lp = vocab_parallel_logprobs_at(logits, ids, vocab_size=13)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(2, 4, dtype=torch.float64), atol=1e-12, rtol=0)


def test_bf16_logits_get_fp32_math_and_bf16_grad():
    torch.manual_seed(4)
    logits = torch.randn(2, 4, 16).bfloat16().requires_grad_(True)
    ids = torch.randint(0, 16, (2, 4, 3))
    lp = token_topk_logprobs(logits, ids, vocab_size=16)
    lp.sum().backward()
    assert lp.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    ref = _reference_token_topk(logits.detach().float(), ids, 16, 1.0)
    torch.testing.assert_close(lp.double(), ref, atol=1e-5, rtol=0)


def test_filler_ids_stay_finite():
    """Ids outside [0, vocab_size) (fillers of masked positions) give finite values and gradients."""
    logits = torch.randn(1, 3, 8, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[[-1, 2], [7, 9], [0, 1]]])  # vocab_size 6: 7 is padding, 9 and -1 out of range
    lp = vocab_parallel_logprobs_at(logits, ids, vocab_size=6)
    lp.sum().backward()
    assert torch.isfinite(lp).all() and torch.isfinite(logits.grad).all()
    assert torch.all(logits.grad[..., 6:] == 0)


def test_clear_errors():
    logits = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_logprobs_at(logits, torch.zeros(2, 4, 3, dtype=torch.long), vocab_size=8, temperature=0.0)
    with pytest.raises(ValueError, match="ids must have"):
        vocab_parallel_logprobs_at(logits, torch.zeros(2, 3, 3, dtype=torch.long), vocab_size=8)
    with pytest.raises(ValueError, match="ids must have"):
        vocab_parallel_logprobs_at(logits, torch.zeros(2, 4, dtype=torch.long), vocab_size=8)
    with pytest.raises(ValueError, match="integer"):
        vocab_parallel_logprobs_at(logits, torch.zeros(2, 4, 3), vocab_size=8)
    with pytest.raises(ValueError, match="B, T, V_local"):
        token_topk_logprobs(logits, torch.zeros(2, 5, 3, dtype=torch.long), vocab_size=8)
