"""Token-budget micro-batching and the DP split (pure torch, no megatron)."""

import itertools

import pytest
import torch

from megatron_s2lpo.learner.batching import (
    make_micro_batches,
    pack_sequences,
    round_up,
    scatter_rows,
    split_rows_for_data_parallel,
    uniform_micro_batches,
)
from megatron_s2lpo.types import TrainBatch


def _batch(seq_lens, width=None, with_ref=True):
    torch.manual_seed(0)
    num_seqs, width = len(seq_lens), width or max(seq_lens)
    tokens = torch.randint(1, 50, (num_seqs, width))
    mask = torch.zeros(num_seqs, width)
    for b, n in enumerate(seq_lens):
        tokens[b, n:] = 0
        mask[b, 2:n] = 1
    rand = lambda: torch.randn(num_seqs, width) * mask  # noqa: E731
    return TrainBatch(tokens=tokens, loss_mask=mask, advantages=rand(), old_logprobs=rand(),
                      behaviour_logprobs=rand(), sources=torch.zeros(num_seqs, dtype=torch.long),
                      seq_lens=torch.tensor(seq_lens), ref_logprobs=rand() if with_ref else None)


@pytest.mark.parametrize("seed", range(20))
def test_pack_sequences_respects_budget_and_covers_every_row(seed):
    gen = torch.Generator().manual_seed(seed)
    seq_lens = torch.randint(1, 40, (int(torch.randint(1, 30, (1,), generator=gen)),), generator=gen).tolist()
    budget, multiple = int(torch.randint(40, 200, (1,), generator=gen)), [1, 8][seed % 2]
    groups = pack_sequences(seq_lens, budget, multiple)
    assert sorted(itertools.chain(*groups)) == list(range(len(seq_lens)))  # each row exactly once
    for group in groups:
        cost = len(group) * round_up(max(seq_lens[i] for i in group), multiple)
        assert cost <= budget
        assert [seq_lens[i] for i in group] == sorted((seq_lens[i] for i in group), reverse=True)
    # Greedy by construction: the next micro-batch's first row would not have fit the previous one.
    for prev, nxt in zip(groups, groups[1:]):
        assert (len(prev) + 1) * round_up(seq_lens[prev[0]], multiple) > budget


def test_pack_sequences_examples_and_errors():
    assert pack_sequences([3, 9, 4, 2], max_tokens=10) == [[1], [2, 0], [3]]
    assert pack_sequences([5, 5, 5, 5], max_tokens=20) == [[0, 1, 2, 3]]
    assert pack_sequences([5, 5, 5, 5], max_tokens=20, multiple=8) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="learner.micro_batch_tokens=16"):
        pack_sequences([10, 17], max_tokens=16)


def test_split_rows_for_data_parallel_balances_tokens():
    seq_lens = [30, 5, 22, 7, 18, 9, 11, 3]
    shares = split_rows_for_data_parallel(seq_lens, 2)
    assert sorted(shares[0] + shares[1]) == list(range(8))
    loads = [sum(seq_lens[i] for i in share) for share in shares]
    assert abs(loads[0] - loads[1]) <= max(seq_lens)
    assert shares == split_rows_for_data_parallel(seq_lens, 2)  # deterministic on every rank
    assert split_rows_for_data_parallel(seq_lens, 1) == [list(range(8))]
    with pytest.raises(ValueError, match="3 data-parallel ranks"):
        split_rows_for_data_parallel([4, 5], 3)


@pytest.mark.parametrize("with_ref", [True, False])
def test_make_micro_batches_slices_and_pads(with_ref):
    batch = _batch([7, 12, 3, 9, 12], width=12, with_ref=with_ref)
    rows = [0, 2, 3, 4]
    micro = make_micro_batches(batch, rows, max_tokens=24, multiple=4)
    assert sorted(int(i) for m in micro for i in m.indices) == rows
    for m in micro:
        assert m.seq_len % 4 == 0 and m.num_seqs * m.seq_len <= 24
        assert torch.equal(m.position_ids[0], torch.arange(m.seq_len))
        for j, row in enumerate(m.indices.tolist()):
            n = min(m.seq_len, 12)
            assert torch.equal(m.tokens[j, :n], batch.tokens[row, :n])
            assert torch.equal(m.loss_mask[j, :n], batch.loss_mask[row, :n])
            assert torch.equal(m.advantages[j, :n], batch.advantages[row, :n])
            assert torch.all(m.loss_mask[j, n:] == 0) and torch.all(m.tokens[j, n:] == 0)
            assert (m.ref_logprobs is None) == (not with_ref)
    # seq 1 (length 12) rounded to 12: fits; a length-12 row in a 16-wide pad zeros past 12
    wide = make_micro_batches(batch, [1], max_tokens=16, multiple=16)[0]
    assert wide.seq_len == 16 and torch.all(wide.tokens[0, 12:] == 0)


def test_uniform_micro_batches_and_scatter_round_trip():
    batch = _batch([10, 4, 7, 3, 9])
    micro = make_micro_batches(batch, list(range(5)), max_tokens=20)
    uniform = uniform_micro_batches(micro, multiple_of=4)
    assert len(uniform) % 4 == 0 and len(uniform) >= len(micro)
    assert len({(m.num_seqs, m.seq_len) for m in uniform}) == 1
    assert sum(float(m.loss_mask.sum()) for m in uniform) == float(batch.loss_mask.sum())
    for m in uniform:
        assert torch.all(m.loss_mask[m.indices < 0] == 0)
    # scatter_rows puts every row back where it came from (fillers skipped)
    rebuilt = scatter_rows([(m.indices, m.old_logprobs) for m in uniform], 5, batch.tokens.shape[1])
    assert torch.equal(rebuilt, batch.old_logprobs)
