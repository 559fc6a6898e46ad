"""Scored groups -> TrainBatch (alignment, padding, advantages), mini-batches, PODS over both
sources, per-source metrics; checked against per-token loops."""

import math

import pytest
import torch

from megatron_s2lpo.algo.batch import build_train_batch, mini_batch_rows, pods_downsample, take_rows
from megatron_s2lpo.trainer.metrics import MetricsWriter, read_metrics
from megatron_s2lpo.config import LoggingConfig
from megatron_s2lpo.trainer.metrics import rollout_counts, source_metrics
from megatron_s2lpo.types import FinishReason, Group, Prompt, Rollout, Source


def rollout(pid, j, source, prompt, response, reward, mask=None):
    return Rollout(prompt_id=pid, sample_index=j, source=source, prompt_ids=prompt, response_ids=response,
                   response_logprobs=[-0.1 * (t + 1) for t in range(len(response))],
                   finish_reason=FinishReason.STOP, weight_version=0, loss_mask=mask, reward=reward)


def make_groups():
    p1 = Prompt(prompt_id="a", text="", ground_truth="1", token_ids=[5, 6])
    p2 = Prompt(prompt_id="b", text="", ground_truth="2", token_ids=[7, 8, 9])
    g1 = Group(prompt=p1, rollouts=[rollout("a", 0, Source.EXPLORER, [5, 6], [10, 11, 12], 1.0),
                                    rollout("a", 1, Source.LEARNER, [5, 6], [13], 0.0, mask=[0])])
    g2 = Group(prompt=p2, rollouts=[rollout("b", 0, Source.EXPLORER, [7, 8, 9], [14, 15], 0.0),
                                    rollout("b", 1, Source.LEARNER, [7, 8, 9], [16, 17, 18, 19], 1.0)])
    return [g1, g2]


def test_batch_alignment_matches_a_token_loop():
    groups = make_groups()
    adv = torch.tensor([0.5, -0.5, -1.0, 1.0])
    batch = build_train_batch(groups, adv, pad_token_id=0)
    rollouts = [r for g in groups for r in g.rollouts]
    assert batch.tokens.shape == (4, 7)
    for b, r in enumerate(rollouts):
        seq = r.prompt_ids + r.response_ids
        assert int(batch.seq_lens[b]) == len(seq)
        for t in range(7):
            tok = seq[t] if t < len(seq) else 0
            assert int(batch.tokens[b, t]) == tok
            in_resp = len(r.prompt_ids) <= t < len(seq)
            m = r.loss_mask[t - len(r.prompt_ids)] if in_resp else 0
            assert float(batch.loss_mask[b, t]) == m
            lp = r.response_logprobs[t - len(r.prompt_ids)] if in_resp else 0.0
            assert float(batch.behaviour_logprobs[b, t]) == pytest.approx(lp)
            assert float(batch.advantages[b, t]) == pytest.approx(float(adv[b]) * m)
    assert batch.sources.tolist() == [1, 0, 1, 0]
    assert torch.equal(batch.old_logprobs, batch.behaviour_logprobs)


def test_batch_errors_name_the_problem():
    with pytest.raises(ValueError, match="one advantage per rollout"):
        build_train_batch(make_groups(), torch.zeros(3))
    with pytest.raises(ValueError, match="no rollouts"):
        build_train_batch([], torch.zeros(0))


def test_take_rows_and_mini_batches():
    batch = build_train_batch(make_groups(), torch.tensor([0.5, -0.5, -1.0, 1.0]))
    sub = take_rows(batch, [0, 1])
    assert sub.tokens.shape == (2, 5)  # trimmed to its longest sequence
    assert torch.equal(sub.tokens, batch.tokens[:2, :5])
    assert mini_batch_rows(5, 2) == [[0, 1], [2, 3, 4]] or mini_batch_rows(5, 2) == [[0, 1, 2], [3, 4]]
    rows = mini_batch_rows(7, 3)
    assert sorted(i for r in rows for i in r) == list(range(7)) and all(rows)
    with pytest.raises(ValueError, match="mini_batches_per_step"):
        mini_batch_rows(2, 3)


def test_pods_keeps_max_variance_across_sources():
    p = Prompt(prompt_id="a", text="", ground_truth="1", token_ids=[1])
    rewards = [0.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    sources = [Source.EXPLORER] * 3 + [Source.LEARNER] * 3
    g = Group(prompt=p, rollouts=[rollout("a", j, s, [1], [2], r) for j, (s, r) in enumerate(zip(sources, rewards))])
    (kept,) = pods_downsample([g], 4, "max_variance", torch.Generator().manual_seed(0))
    kept_rewards = sorted(r.reward for r in kept.rollouts)
    assert kept_rewards == [0.0, 0.0, 1.0, 1.0]  # the max-variance 4 of them: two of each
    assert [r.sample_index for r in kept.rollouts] == sorted(r.sample_index for r in kept.rollouts)


def test_source_metrics_against_loops():
    groups = make_groups()
    adv = torch.tensor([0.5, -0.5, -1.0, 1.0])
    batch = build_train_batch(groups, adv)
    batch.old_logprobs = batch.behaviour_logprobs + 0.25 * batch.loss_mask
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    m = source_metrics(batch, rewards, adv)
    assert m["share/explorer"] == 0.5 and m["reward/explorer"] == 0.5 and m["accuracy/learner"] == 0.5
    assert m["response_len/learner"] == pytest.approx((0 + 4) / 2)  # loss tokens, mask 0 excluded
    assert m["advantage/explorer"] == pytest.approx(-0.25)
    assert m["logp_mismatch/learner"] == pytest.approx(0.25)
    params = {Source.LEARNER: 10, Source.EXPLORER: 3}
    counts = rollout_counts(groups, params)
    assert counts["rollout_tokens/explorer"] == 5 + 5
    assert counts["rollout_flops/learner"] == 2 * 10 * (3 + 7)


def test_metrics_writer_truncates_after_resume_step(tmp_path):
    writer = MetricsWriter(str(tmp_path), LoggingConfig())
    for step in range(1, 5):
        writer.write(step, {"x": float(step), "bad": math.nan})
    with open(writer.path, "a") as f:
        f.write('{"step": 5, "x"')  # a line cut by a kill
    assert writer.truncate_after(2) == 2
    records = read_metrics(writer.path)
    assert [r["step"] for r in records] == [1, 2] and records[0]["bad"] is None
    assert writer.truncate_after(7) == 2
    assert writer.truncate_after(0) is None and read_metrics(writer.path) == []


def test_metrics_writer_tensorboard_without_the_package_is_a_clear_error(tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="logging.tensorboard"):
            MetricsWriter(str(tmp_path), LoggingConfig(tensorboard=True))
        return
    writer = MetricsWriter(str(tmp_path), LoggingConfig(tensorboard=True))
    writer.write(1, {"x": 1.0})
    writer.close()
    assert (tmp_path / "tensorboard").is_dir()
