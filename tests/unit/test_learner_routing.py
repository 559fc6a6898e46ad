"""Routing replay without megatron: the router hook against a float64 reference (weights and the
router's gradient), its call order under activation recompute, token order, sanitising, the
agreement metric, and routed experts through the batch builder."""

import torch
import torch.nn.functional as F
import pytest

from megatron_s2lpo.algo.batch import build_train_batch, take_rows
from megatron_s2lpo.learner.batching import make_micro_batches, random_batch
from megatron_s2lpo.learner.routing import MISSING, RouterReplay, agreement, sanitize, token_positions
from megatron_s2lpo.types import FinishReason, Group, Prompt, Rollout, Source


def topk(scores, k, num_groups=None, group_topk=None):
    return torch.topk(scores, k=k, dim=1)


def routed_weights(replay: RouterReplay, logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """megatron's softmax-after-top-k routing (moe_router_pre_softmax=False) through the hook."""
    chosen, ids = replay.get_replay_topk(logits, k, None, None, topk)
    return torch.softmax(chosen, dim=-1), ids


def test_replay_uses_targets_with_the_learners_own_weights_and_router_gradient():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[4, 1], [MISSING, MISSING], [0, 5], [2, 3], [5, 4]])
    replay = RouterReplay(layer=0)
    replay.reset(training=False, recording=True)
    replay.pending.append(target)
    weights, ids = routed_weights(replay, logits, 2)
    upstream = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    (weights * upstream).sum().backward()

    free = torch.topk(logits.detach(), 2, dim=1).indices
    expected_ids = target.clone()
    expected_ids[1] = free[1]  # no target: the router's own choice
    assert torch.equal(ids, expected_ids)
    assert torch.equal(replay.recorded[0].long(), expected_ids)
    ref_logits = logits.detach().clone().requires_grad_(True)  # HF-style: softmax over all, renormalised
    probs = torch.softmax(ref_logits, -1).gather(1, expected_ids)
    ref = probs / probs.sum(-1, keepdim=True)
    (ref * upstream).sum().backward()
    assert torch.allclose(weights, ref, atol=1e-12)
    assert torch.allclose(logits.grad, ref_logits.grad, atol=1e-12)  # the router keeps its gradient
    assert logits.grad.abs().sum() > 0


def test_recompute_in_the_backward_replays_the_same_targets_in_order():
    """Two micro-batches through a checkpointed router (run without grad, recomputed in the
    backward, as megatron's activation recompute does) give the gradients of a plain run."""
    replay = RouterReplay(layer=0)
    weight = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    targets = [torch.tensor([[0, 1], [2, 3], [MISSING, MISSING]]), torch.tensor([[5, 4], [3, 2], [1, 0]])]
    inputs = [torch.randn(3, 4, dtype=torch.float64, requires_grad=True) for _ in targets]

    def layer(x: torch.Tensor) -> torch.Tensor:
        w, _ = routed_weights(replay, F.linear(x, weight), 2)
        return w

    def run(recompute: bool) -> torch.Tensor:
        weight.grad = None
        replay.reset(training=True, recording=False)
        outs = []
        for x, target in zip(inputs, targets):
            replay.pending.append(target)
            outs.append(torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=True) if recompute else layer(x))
        sum((o * (i + 1)).sum() for i, o in enumerate(outs)).backward()
        assert not replay.pending and not replay.recompute
        return weight.grad.clone()

    assert torch.allclose(run(recompute=True), run(recompute=False), atol=1e-12)


def test_token_positions_follow_megatrons_sbh_order():
    batch = random_batch([5, 3, 7], vocab_size=20, prompt_tokens=1)
    padded = make_micro_batches(batch, [0, 1, 2], max_tokens=64)[0]  # rows sorted longest first: 2, 0, 1
    rows, cols = token_positions(padded)
    assert (rows[:3].tolist(), cols[:3].tolist()) == ([0, 1, 2], [0, 0, 0])  # s-major: token s * b + j
    packed = make_micro_batches(batch, [0, 1, 2], max_tokens=64, multiple=4, packed=True)[0]
    rows, cols = token_positions(packed)
    assert rows.tolist() == [0] * 7 + [-1] + [1] * 5 + [-1] * 3 + [2] * 3 + [-1]  # padding of each sequence
    assert cols[:8].tolist() == list(range(8))
    sp_rows, sp_cols = token_positions(packed, tp_rank=1, tp_size=2, sequence_parallel=True)
    assert torch.equal(sp_rows, rows[10:]) and torch.equal(sp_cols, cols[10:])


def test_sanitize_drops_tokens_that_would_break_the_dispatcher():
    ids = torch.tensor([[0, 1], [1, 1], [3, 4], [-1, -1], [2, 0]], dtype=torch.int16)
    assert sanitize(ids, num_experts=4).tolist() == [[0, 1], [-1, -1], [-1, -1], [-1, -1], [2, 0]]


def test_agreement_counts_shared_experts_where_both_routed():
    learner = torch.tensor([[[[0, 1]], [[2, 3]], [[-1, -1]]]], dtype=torch.int16)  # (B=1, T=3, L=1, k=2)
    engine = torch.tensor([[[[1, 0]], [[2, 1]], [[0, 1]]]], dtype=torch.int16)
    result = agreement(learner, engine, torch.ones(1, 3))
    assert result == {"overlap": 0.75, "exact": 0.5}
    assert agreement(learner, engine, torch.zeros(1, 3))["overlap"] != agreement(learner, engine, torch.zeros(1, 3))["overlap"]


def _rollout(source: Source, prompt: list[int], response: list[int], routed: torch.Tensor | None) -> Rollout:
    return Rollout(prompt_id="p", sample_index=0, source=source, prompt_ids=prompt, response_ids=response,
                   response_logprobs=[-0.5] * len(response), finish_reason=FinishReason.STOP, weight_version=0,
                   reward=1.0, routed_experts=routed)


def test_batch_builder_lays_routed_experts_out_per_token_and_layer():
    routed = torch.arange(4 * 4, dtype=torch.int16).view(4, 4)  # 2 + 3 - 1 tokens, 2 layers x top-2
    learner = _rollout(Source.LEARNER, [5, 6], [7, 8, 9], routed)
    explorer = _rollout(Source.EXPLORER, [5, 6, 7], [8], None)
    group = Group(prompt=Prompt(prompt_id="p", text="", ground_truth=""), rollouts=[explorer, learner])
    batch = build_train_batch([group], torch.tensor([1.0, -1.0]), routing_top_k=2)
    assert batch.routed_experts.shape == (2, 5, 2, 2)
    assert (batch.routed_experts[0] == -1).all()  # the explorer's sample carries none
    assert torch.equal(batch.routed_experts[1, :4].reshape(4, 4), routed)
    assert (batch.routed_experts[1, 4] == -1).all()  # the last token was never run
    assert torch.equal(take_rows(batch, [1]).routed_experts[0], batch.routed_experts[1])
    with pytest.raises(ValueError, match="routing_top_k"):
        build_train_batch([group], torch.tensor([1.0, -1.0]), routing_top_k=3)
    with pytest.raises(ValueError, match="routed_experts has shape"):
        _rollout(Source.LEARNER, [5, 6], [7, 8, 9], routed[:3])
