"""Packed (THD) micro-batches, the packed attention kernels and chunked log-probs (pure torch)."""

import dataclasses
import itertools

import pytest
import torch

from megatron_s2lpo.learner.attention import attention_kernel, block_causal_mask, length_groups, packed_attention
from megatron_s2lpo.learner.batching import bin_pack, make_micro_batches, random_batch, round_up, uniform_micro_batches
from megatron_s2lpo.learner.logprobs import chunked_logprobs, token_logprobs, token_topk_logprobs


def _batch(seq_lens, vocab=50):
    """`random_batch` (prompts of 2 tokens) with random log-probs and advantages, sources alternating."""
    batch = random_batch(seq_lens, vocab, prompt_tokens=2)
    gen = torch.Generator().manual_seed(1)
    rand = lambda: torch.randn(batch.tokens.shape, generator=gen) * batch.loss_mask  # noqa: E731
    return dataclasses.replace(batch, advantages=rand(), old_logprobs=rand(), behaviour_logprobs=rand(),
                               sources=torch.arange(len(seq_lens)) % 2)


@pytest.mark.parametrize("seed", range(10))
def test_bin_pack_respects_budget_and_covers_every_row(seed):
    gen = torch.Generator().manual_seed(seed)
    seq_lens = torch.randint(1, 60, (int(torch.randint(1, 40, (1,), generator=gen)),), generator=gen).tolist()
    budget, multiple = int(torch.randint(60, 300, (1,), generator=gen)), [1, 16][seed % 2]
    packs = bin_pack(seq_lens, budget, multiple)
    assert sorted(itertools.chain(*packs)) == list(range(len(seq_lens)))
    for pack in packs:
        assert sum(round_up(seq_lens[i], multiple) for i in pack) <= budget
        assert [seq_lens[i] for i in pack] == sorted((seq_lens[i] for i in pack), reverse=True)
    # first fit: a later pack's first sequence fit no earlier pack when it was placed
    padded = sum(round_up(n, multiple) for n in seq_lens)
    assert len(packs) <= 2 * -(-padded // budget) + 1


def test_bin_pack_example_and_error_names_both_numbers():
    assert bin_pack([3, 9, 4, 2], max_tokens=10) == [[1], [2, 0, 3]]
    with pytest.raises(ValueError, match=r"sequence 1 has 17 tokens .*learner.micro_batch_tokens=16"):
        bin_pack([10, 17], max_tokens=16)


def test_packed_micro_batches_lay_rows_back_to_back():
    batch = _batch([7, 12, 3, 9, 12])
    rows = [0, 2, 3, 4]
    micro = make_micro_batches(batch, rows, max_tokens=40, multiple=4, packed=True)
    assert sorted(int(i) for m in micro for i in m.indices) == rows
    for m in micro:
        packed = m.packed
        lengths = (packed.cu_seqlens[1:] - packed.cu_seqlens[:-1]).tolist()
        assert packed.num_tokens == sum(lengths) <= 40 and all(n % 4 == 0 for n in lengths)
        assert packed.max_seqlen == max(lengths) and m.input_shape == (1, packed.num_tokens)
        for j, row in enumerate(m.indices.tolist()):
            start, n = int(packed.cu_seqlens[j]), int(batch.seq_lens[row])
            assert torch.equal(packed.tokens[0, start:start + n], batch.tokens[row, :n])
            assert torch.equal(packed.position_ids[0, start:start + lengths[j]], torch.arange(lengths[j]))
            assert int(m.sources[j]) == int(batch.sources[row])
        # the model output before each loss-layout token holds the previous token of that row
        rows_, cols = (m.loss_mask > 0).nonzero(as_tuple=True)
        index = m.prediction_index(rows_, cols)
        assert torch.equal(packed.tokens[0, index], m.tokens[rows_, cols - 1])


def test_padded_prediction_index_is_the_previous_column():
    m = make_micro_batches(_batch([5, 8]), [0, 1], max_tokens=32)[0]
    rows, cols = (m.loss_mask > 0).nonzero(as_tuple=True)
    assert torch.equal(m.tokens.reshape(-1)[m.prediction_index(rows, cols)], m.tokens[rows, cols - 1])


def test_uniform_packs_grow_the_last_sequence_and_add_loss_free_fillers():
    batch = _batch([20, 5, 9, 14, 3])
    micro = make_micro_batches(batch, list(range(5)), max_tokens=24, packed=True)
    out = uniform_micro_batches(micro, multiple_of=4)
    assert len(out) % 4 == 0
    size = max(m.packed.num_tokens for m in micro)
    assert {m.packed.num_tokens for m in out} == {size}
    for original, grown in zip(micro, out):
        assert int(grown.packed.cu_seqlens[-1]) == size
        assert torch.equal(grown.packed.cu_seqlens[:-1], original.packed.cu_seqlens[:-1])
        assert torch.equal(grown.packed.tokens[0, :original.packed.num_tokens], original.packed.tokens[0])
    for filler in out[len(micro):]:
        assert (filler.indices == -1).all() and float(filler.loss_mask.sum()) == 0


def _reference_attention(q, k, v, seq_lens, scale):
    """float64 per-sequence causal softmax attention with GQA groups repeated, (T, H, D)."""
    groups = q.shape[1] // k.shape[1]
    out, start = [], 0
    for n in seq_lens:
        qs, ks, vs = (t[start:start + n].double().transpose(0, 1) for t in (q, k, v))
        ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
        scores = qs @ ks.transpose(1, 2) * scale
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        out.append((scores.softmax(-1) @ vs).transpose(0, 1))
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("kernel, seq_lens", [("masked", [5, 1, 9, 3]), ("split", [5, 1, 9, 3]),
                                              ("grouped", [5, 1, 9, 3]), ("grouped", [40, 3, 38, 2, 9, 37, 1])])
def test_packed_attention_kernels_match_per_sequence_attention(kernel, seq_lens):
    torch.manual_seed(0)
    heads, groups, dim = 4, 2, 8
    total = sum(seq_lens)
    q = torch.randn(total, heads, dim, requires_grad=True)
    k = torch.randn(total, groups, dim, requires_grad=True)
    v = torch.randn(total, groups, dim, requires_grad=True)
    cu = torch.tensor([0, *itertools.accumulate(seq_lens)], dtype=torch.int32)
    out = packed_attention(q, k, v, cu, max(seq_lens), scale=dim ** -0.5, kernel=kernel)
    want = _reference_attention(q, k, v, seq_lens, dim ** -0.5)
    assert (out.double() - want).abs().max() < 1e-6
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref = torch.autograd.grad(want, (q, k, v), grad.double())
    assert max(float((a.double() - b).abs().max()) for a, b in zip(got, ref)) < 5e-6  # fp32 sums over 40 keys


def test_attention_kernel_choice_mask_and_errors():
    cpu = torch.zeros(1, 2, 4)
    assert attention_kernel(cpu, [100, 100]) == attention_kernel(cpu, [10] * 20) == "grouped"  # off CUDA
    assert length_groups([300, 290, 12, 11, 10, 9, 280]) == [[0, 1, 6, 2], [3, 4, 5]]  # long ones batched
    assert length_groups([7] * 5) == [[0, 1, 2, 3, 4]]
    assert block_causal_mask([2, 1]).tolist() == [[True, False, False], [True, True, False], [False, False, True]]
    with pytest.raises(ValueError, match="cu_seqlens cover 3 tokens"):
        packed_attention(torch.zeros(4, 1, 2), torch.zeros(4, 1, 2), torch.zeros(4, 1, 2),
                         torch.tensor([0, 3]), 3, scale=1.0)


@pytest.mark.parametrize("chunk, recompute", [(0, False), (4, False), (3, True)])
def test_chunked_logprobs_equal_full_logits_with_gradients(chunk, recompute):
    torch.manual_seed(0)
    num, width, hidden, vocab = 3, 7, 6, 11
    head = torch.nn.Linear(hidden, vocab, bias=False)
    states = torch.randn(num, width, hidden, requires_grad=True)
    tokens = torch.randint(0, vocab, (num, width))
    topk = torch.randint(0, vocab, (num, width, 2))
    mask = torch.rand(num, width) > 0.3
    mask[:, 0] = False
    full_lp, full_ent = token_logprobs(head(states), tokens, vocab_size=vocab, temperature=0.7, with_entropy=True)
    full_topk = token_topk_logprobs(head(states), topk, vocab_size=vocab, temperature=0.7)
    rows, cols = mask.nonzero(as_tuple=True)
    lp, ent, at = chunked_logprobs(states.reshape(-1, hidden), rows * width + cols - 1, tokens[rows, cols], head,
                                   vocab_size=vocab, temperature=0.7, with_entropy=True, topk_ids=topk[rows, cols],
                                   chunk_tokens=chunk, recompute=recompute)
    for got, want in ((lp, full_lp[rows, cols]), (ent, full_ent[rows, cols]), (at, full_topk[rows, cols])):
        assert (got - want).abs().max() < 1e-6
    weights = torch.randn(3)
    loss = lambda a, b, c: weights[0] * a.sum() + weights[1] * b.sum() + weights[2] * c.sum()  # noqa: E731
    got = torch.autograd.grad(loss(lp, ent, at), (states, head.weight))
    want = torch.autograd.grad(loss(full_lp[rows, cols], full_ent[rows, cols], full_topk[rows, cols]),
                               (states, head.weight))
    assert max(float((a - b).abs().max()) for a, b in zip(got, want)) < 1e-5


def test_chunked_logprobs_with_nothing_selected_stays_in_the_graph():
    states = torch.randn(4, 3, requires_grad=True)
    lp, ent, at = chunked_logprobs(states, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                                   torch.nn.Linear(3, 5), vocab_size=5, with_entropy=True)
    assert lp.shape == ent.shape == (0,) and at is None
    (grad,) = torch.autograd.grad(lp.sum() + ent.sum(), states)
    assert float(grad.abs().sum()) == 0.0


def test_chunked_logprobs_never_hold_all_logits():
    from megatron_s2lpo.planner.measure import peak_allocated_bytes

    torch.manual_seed(0)
    tokens, hidden, vocab = 256, 16, 2048
    head = torch.nn.Linear(hidden, vocab, bias=False)
    states = torch.randn(tokens, hidden, requires_grad=True)
    index, targets = torch.arange(tokens), torch.randint(0, vocab, (tokens,))
    full_buffer = tokens * vocab * 4  # one fp32 (tokens x vocab) tensor: 2 MB

    def run(chunk):
        lp, ent, _ = chunked_logprobs(states, index, targets, head, vocab_size=vocab, with_entropy=True,
                                      chunk_tokens=chunk, recompute=chunk > 0)
        (lp.sum() + ent.sum()).backward()

    unchunked, _ = peak_allocated_bytes(lambda: run(0))
    chunked, _ = peak_allocated_bytes(lambda: run(16))
    assert unchunked > 4 * full_buffer  # logits, shifted logits, exp, gradients: several full buffers
    assert chunked < full_buffer / 2  # a few (16 x vocab) buffers at a time, never one for all tokens
