"""Parity check pieces against slow references: the batch layout, the metric, the requests,
the version and threshold decisions (one process; the TP / PP / DP runs are in
tests/distributed/test_sync_distributed.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from megatron_s2lpo.rollout.engine import Completion
from megatron_s2lpo.sync.collective import run_on_driver
from megatron_s2lpo.sync.errors import WeightParityError, WeightVersionError
from megatron_s2lpo.sync.parity import (check_parity, completions_to_batch, logprob_gap, parity_message,
                                        parity_requests)
from megatron_s2lpo.types import FinishReason

ONE_RANK = SimpleNamespace(rank=0, world_size=1, dp_rank=0)
SAMPLES = [([5, 6, 7], [8, 9], [-0.5, -1.5]), ([1], [2, 3, 4], [-0.1, -0.2, -0.3]), ([4, 4], [0], [-2.0])]


def test_batch_layout_matches_a_loop():
    batch = completions_to_batch(SAMPLES)
    assert batch.tokens.shape == (3, 5) and batch.seq_lens.tolist() == [5, 4, 3]
    for b, (prompt, response, logprobs) in enumerate(SAMPLES):
        for t in range(5):
            j = t - len(prompt)
            in_response = 0 <= j < len(response)
            expected_token = (prompt + response)[t] if t < len(prompt) + len(response) else 0
            assert int(batch.tokens[b, t]) == expected_token
            assert float(batch.loss_mask[b, t]) == float(in_response)
            assert float(batch.behaviour_logprobs[b, t]) == pytest.approx(logprobs[j] if in_response else 0.0)


def test_gap_is_mean_and_max_over_response_tokens_only():
    batch = completions_to_batch(SAMPLES)
    learner = batch.behaviour_logprobs.clone()
    learner[0, 3] += 0.3  # a response token
    learner[1, 2] -= 0.1  # a response token
    learner[0, 0] += 50.0  # a prompt position: must not count
    mean, largest, count = logprob_gap(learner, batch)
    assert count == 6 and mean == pytest.approx(0.4 / 6) and largest == pytest.approx(0.3)


def test_requests_are_fixed_and_varied():
    a = parity_requests(100, num_sequences=5, max_new_tokens=7, temperature=0.9, seed=3)
    b = parity_requests(100, num_sequences=5, max_new_tokens=7, temperature=0.9, seed=3)
    assert [(r.prompt_ids, r.seed) for r in a] == [(r.prompt_ids, r.seed) for r in b]
    assert [len(r.prompt_ids) for r in a] == [16, 15, 14, 13, 16]
    assert len({r.seed for r in a}) == 5 and all(0 <= t < 100 for r in a for t in r.prompt_ids)
    assert all(r.temperature == 0.9 and r.max_new_tokens == 7 and r.top_p == 1.0 for r in a)
    other = parity_requests(100, num_sequences=5, max_new_tokens=7, temperature=0.9, seed=4)
    assert [r.prompt_ids for r in other] != [r.prompt_ids for r in a]


class ScriptedEngine:
    """Returns fixed completions (response token 1 with log-prob -1.0) at a given version."""

    def __init__(self, version: int) -> None:
        self.version = version
        self.requests = []

    def generate(self, requests):
        self.requests.extend(requests)
        return [Completion(request_id=r.request_id, prompt_ids=r.prompt_ids, token_ids=[1, 2], text="",
                           logprobs=[-1.0, -2.0], finish_reason=FinishReason.LENGTH, weight_version=self.version)
                for r in requests]


class ConstantLearner:
    def __init__(self, offset: float) -> None:
        self.offset = offset
        self.temperatures = []

    def compute_logprobs(self, batch, temperature=1.0):
        self.temperatures.append(temperature)
        return batch.behaviour_logprobs + self.offset * batch.loss_mask


def run(engine, learner, **kwargs):
    args = dict(vocab_size=50, num_sequences=2, max_new_tokens=2, threshold=0.01, temperature=0.7, version=3)
    return check_parity(engine, learner, ONE_RANK, **{**args, **kwargs})


def test_threshold_decides():
    learner = ConstantLearner(0.005)
    report = run(ScriptedEngine(3), learner)
    assert report.passed and report.mean_abs_diff == pytest.approx(0.005) and report.num_tokens == 4
    assert learner.temperatures == [0.7]
    with pytest.raises(WeightParityError) as info:
        run(ScriptedEngine(3), ConstantLearner(0.02))
    assert info.value.report.mean_abs_diff == pytest.approx(0.02)
    assert str(info.value) == parity_message(info.value.report)
    assert "ScriptedEngine" in str(info.value) and "2 sequences, temperature 0.7" in str(info.value)


def test_engine_on_another_version_is_a_version_error():
    with pytest.raises(WeightVersionError, match=r"sampled the parity completions with weight version\(s\) "
                                                 r"\[2\], expected 3"):
        run(ScriptedEngine(2), ConstantLearner(0.0))
    assert run(ScriptedEngine(2), ConstantLearner(0.0), version=None).passed  # not checked


def test_run_on_driver_single_rank_returns_and_raises():
    assert run_on_driver(lambda: 41 + 1, ONE_RANK) == 42
    with pytest.raises(KeyError):
        run_on_driver(lambda: {}["missing"], ONE_RANK)
