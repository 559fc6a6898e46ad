"""Scored groups -> `TrainBatch`: pure marshalling, no model and no process group.

    batch = build_train_batch(groups, advantages)     # (B, T) right-padded tensors
    mini = take_rows(batch, rows)                     # a mini-batch of the same step

Row order: group by group, each group's rollouts in their order (explorer first, see
rollout/collector.py). Alignment (types.py): entry [b, t] is about token t; the log-prob of
response token r sits at column len(prompt) + r, and prompt tokens, entry 0 and padding carry
loss_mask 0. `old_logprobs` starts as a copy of the behaviour log-probs; the trainer replaces
it with the learner's recomputed values.
"""

from __future__ import annotations

import torch

from megatron_s2lpo.types import SOURCE_CODES, Group, TrainBatch


def build_train_batch(groups: list[Group], advantages: torch.Tensor, pad_token_id: int = 0, *,
                      routing_top_k: int | None = None) -> TrainBatch:
    """One row per rollout; `advantages` (num_rollouts,) in the same row order.

    Rollouts that carry the experts their engine routed to (mixture-of-experts learners) fill
    `routed_experts` (B, T, layers, routing_top_k); rows without (explorer samples) are -1."""
    rollouts = [r for g in groups for r in g.rollouts]
    if not rollouts:
        raise ValueError("build_train_batch: the groups hold no rollouts")
    if advantages.shape != (len(rollouts),):
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}, expected ({len(rollouts)},): "
                         "one advantage per rollout, groups concatenated")
    lengths = [len(r.prompt_ids) + len(r.response_ids) for r in rollouts]
    num_seqs, seq_len = len(rollouts), max(lengths)
    tokens = torch.full((num_seqs, seq_len), pad_token_id, dtype=torch.long)  # (B, T)
    loss_mask = torch.zeros(num_seqs, seq_len)  # (B, T)
    behaviour = torch.zeros(num_seqs, seq_len)  # (B, T)
    for row, r in enumerate(rollouts):
        start = len(r.prompt_ids)
        end = start + len(r.response_ids)
        if start == 0:
            raise ValueError(f"rollout {r.prompt_id}/{r.sample_index} has no prompt tokens; the first "
                             "response token needs a context to be scored")
        tokens[row, :end] = torch.tensor(r.prompt_ids + r.response_ids, dtype=torch.long)
        loss_mask[row, start:end] = torch.tensor(r.loss_mask, dtype=torch.float32)
        behaviour[row, start:end] = torch.tensor(r.response_logprobs, dtype=torch.float32)
    adv = advantages.float().unsqueeze(1) * loss_mask  # (B, T): broadcast over response tokens
    routed = _routed_experts(rollouts, seq_len, routing_top_k)
    return TrainBatch(
        tokens=tokens, loss_mask=loss_mask, advantages=adv, old_logprobs=behaviour.clone(),
        behaviour_logprobs=behaviour,
        sources=torch.tensor([SOURCE_CODES[r.source] for r in rollouts], dtype=torch.long),
        seq_lens=torch.tensor(lengths, dtype=torch.long), routed_experts=routed,
    )


def _routed_experts(rollouts: list, seq_len: int, top_k: int | None) -> torch.Tensor | None:
    """(B, T, layers, top_k) int16 of the rollouts' routed_experts, -1 where a row has none."""
    carrying = [r for r in rollouts if r.routed_experts is not None]
    if not carrying:
        return None
    width = carrying[0].routed_experts.shape[1]
    if top_k is None or top_k < 1 or width % top_k:
        raise ValueError(f"rollouts carry routed experts ({width} per token) but routing_top_k={top_k} does not "
                         "divide them: pass the learner model's num_experts_per_tok")
    out = torch.full((len(rollouts), seq_len, width // top_k, top_k), -1, dtype=torch.int16)
    for row, r in enumerate(rollouts):
        if r.routed_experts is None:
            continue
        if r.routed_experts.shape[1] != width:
            raise ValueError(f"rollout {r.prompt_id}/{r.sample_index} carries {r.routed_experts.shape[1]} routed "
                             f"experts per token, others {width}: the engines serve different models")
        out[row, :r.routed_experts.shape[0]] = r.routed_experts.view(-1, width // top_k, top_k).to(torch.int16)
    return out


def take_rows(batch: TrainBatch, rows: torch.Tensor | list[int]) -> TrainBatch:
    """The sub-batch of `rows` (trimmed to its longest sequence)."""
    index = torch.as_tensor(rows, dtype=torch.long)
    seq_len = int(batch.seq_lens[index].max())

    def pick(t: torch.Tensor | None) -> torch.Tensor | None:  # (B, T) or (B, T, K)
        return None if t is None else t[index, :seq_len].clone()

    return TrainBatch(tokens=pick(batch.tokens), loss_mask=pick(batch.loss_mask),
                      advantages=pick(batch.advantages), old_logprobs=pick(batch.old_logprobs),
                      behaviour_logprobs=pick(batch.behaviour_logprobs), sources=batch.sources[index].clone(),
                      seq_lens=batch.seq_lens[index].clone(), ref_logprobs=pick(batch.ref_logprobs),
                      teacher_logprobs=pick(batch.teacher_logprobs), teacher_topk_ids=pick(batch.teacher_topk_ids),
                      teacher_topk_logprobs=pick(batch.teacher_topk_logprobs),
                      routed_experts=pick(batch.routed_experts), replay_experts=pick(batch.replay_experts))


def mini_batch_rows(num_seqs: int, num_mini_batches: int) -> list[list[int]]:
    """Contiguous, near-equal row ranges (groups stay mostly together); none empty."""
    if not 1 <= num_mini_batches <= num_seqs:
        raise ValueError(f"algo.mini_batches_per_step={num_mini_batches} must be in 1..{num_seqs} "
                         "(the number of sequences in the step)")
    bounds = [round(i * num_seqs / num_mini_batches) for i in range(num_mini_batches + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(num_mini_batches)]


def trainable_mini_batches(batch: TrainBatch, num_mini_batches: int) -> list[list[int]]:
    """`mini_batch_rows` without the mini-batches that hold no loss token (every row masked out,
    e.g. all truncated under reward.overlong.mask_truncated): they have nothing to train on."""
    return [rows for rows in mini_batch_rows(batch.num_seqs, num_mini_batches) if bool(batch.loss_mask[rows].any())]


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of `values` where `mask` is 1 (NaN for an empty mask)."""
    total = mask.sum()
    return float((values * mask).sum() / total) if total > 0 else float("nan")


def pods_downsample(groups: list[Group], m: int, method: str, generator: torch.Generator) -> list[Group]:
    """PODS: keep the m rollouts per group that `pods.select` picks from ALL its sources."""
    from megatron_s2lpo.algo.pods import select

    rewards = torch.tensor([g.rewards() for g in groups], dtype=torch.float32)  # (P, n)
    keep = select(rewards, m, method=method, generator=generator)  # (P, m)
    return [Group(prompt=g.prompt, rollouts=[g.rollouts[int(j)] for j in sorted(row.tolist())])
            for g, row in zip(groups, keep)]
