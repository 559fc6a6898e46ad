"""Deterministic, resumable prompt sampler."""

from __future__ import annotations

import json
import random

import pytest
import torch

from megatron_s2lpo.data.sampler import PromptSampler


def draw(sampler, n):
    return [sampler.next_batch() for _ in range(n)]


@pytest.mark.parametrize("drop_last", [True, False])
def test_every_epoch_is_a_permutation(drop_last):
    sampler = PromptSampler(num_prompts=10, batch_size=4, seed=0, drop_last=drop_last)
    assert sampler.batches_per_epoch == (2 if drop_last else 3)
    orders = []
    for epoch in range(4):
        batches = draw(sampler, sampler.batches_per_epoch)
        flat = [i for b in batches for i in b]
        assert len(flat) == len(set(flat))  # no prompt twice in an epoch
        if drop_last:
            assert [len(b) for b in batches] == [4, 4]
        else:
            assert [len(b) for b in batches] == [4, 4, 2]
            assert sorted(flat) == list(range(10))
        assert sampler.epoch == epoch
        orders.append(flat)
    assert len({tuple(o) for o in orders}) == 4  # reshuffled every epoch


def test_shuffle_false_is_sequential():
    sampler = PromptSampler(num_prompts=5, batch_size=2, seed=0, shuffle=False, drop_last=False)
    assert draw(sampler, 4) == [[0, 1], [2, 3], [4], [0, 1]]


def test_independent_of_global_rng_and_seeded():
    random.seed(0)
    torch.manual_seed(0)
    first = draw(PromptSampler(num_prompts=50, batch_size=8, seed=7), 20)
    random.seed(123)
    torch.manual_seed(123)
    assert draw(PromptSampler(num_prompts=50, batch_size=8, seed=7), 20) == first
    assert draw(PromptSampler(num_prompts=50, batch_size=8, seed=8), 20) != first
    assert first[0] == PromptSampler(num_prompts=50, batch_size=8, seed=7).epoch_order(0)[:8]


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("shuffle", [True, False])
def test_resume_matches_uninterrupted_run_at_every_step(drop_last, shuffle):
    # 7 prompts, batch 3: epochs end mid-way through the batch grid, so resumes land on both
    # sides of every epoch boundary within the first 4 epochs.
    kwargs = dict(num_prompts=7, batch_size=3, seed=42, shuffle=shuffle, drop_last=drop_last)
    reference = draw(PromptSampler(**kwargs), 16)
    for stop in range(12):
        sampler = PromptSampler(**kwargs)
        assert draw(sampler, stop) == reference[:stop]
        state = json.loads(json.dumps(sampler.state_dict()))  # survives a checkpoint file
        resumed = PromptSampler(**kwargs)
        resumed.load_state_dict(state)
        assert draw(resumed, 16 - stop) == reference[stop:], f"diverged after resuming at batch {stop}"


def test_state_dict_contents():
    sampler = PromptSampler(num_prompts=7, batch_size=3, seed=1)
    draw(sampler, 3)  # epoch 0: 2 batches (drop_last), then epoch 1 first batch
    state = sampler.state_dict()
    assert (state["epoch"], state["position"], state["seed"]) == (1, 3, 1)


def test_load_state_mismatch_and_bad_values():
    sampler = PromptSampler(num_prompts=7, batch_size=3, seed=1)
    state = sampler.state_dict()
    with pytest.raises(ValueError, match="num_prompts=7 but this sampler has 8"):
        PromptSampler(num_prompts=8, batch_size=3, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=1 but this sampler has 2"):
        PromptSampler(num_prompts=7, batch_size=3, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="lacks 'position'"):
        sampler.load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="position=9"):
        sampler.load_state_dict({"epoch": 0, "position": 9})


def test_constructor_errors():
    with pytest.raises(ValueError, match="batch_size 5 > num_prompts 4"):
        PromptSampler(num_prompts=4, batch_size=5, seed=0)
    with pytest.raises(ValueError, match="num_prompts must be >= 1"):
        PromptSampler(num_prompts=0, batch_size=1, seed=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        PromptSampler(num_prompts=3, batch_size=0, seed=0)
    # batch_size == num_prompts is fine: one full batch per epoch.
    sampler = PromptSampler(num_prompts=4, batch_size=4, seed=0)
    assert [sorted(b) for b in draw(sampler, 3)] == [[0, 1, 2, 3]] * 3
