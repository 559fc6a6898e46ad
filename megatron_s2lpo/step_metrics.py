"""Per-step, per-source metrics of S2L-PO (pure; the trainer logs what these return).

Per source s in (explorer, learner), over the samples trained on this step:
  reward/s, accuracy/s (share with reward >= 1), response_len/s (tokens), share/s (share of
  the group), advantage/s (mean sequence advantage), logp_mismatch/s (mean |learner old
  log-prob - behaviour log-prob| over response tokens), rollout_tokens/s (prompt + response
  tokens generated or read this step) and rollout_flops/s (2 x params x tokens).
"""

from __future__ import annotations

import torch

from megatron_s2lpo.algo.batch import masked_mean
from megatron_s2lpo.types import SOURCE_CODES, Group, Source, TrainBatch


def rollout_counts(groups: list[Group], params: dict[Source, int]) -> dict[str, float]:
    """rollout_tokens/s and rollout_flops/s of every generated sample (before PODS)."""
    out: dict[str, float] = {}
    for source in Source:
        tokens = sum(len(r.prompt_ids) + len(r.response_ids) for g in groups for r in g.rollouts
                     if r.source is source)
        out[f"rollout_tokens/{source.value}"] = float(tokens)
        out[f"rollout_flops/{source.value}"] = 2.0 * params[source] * tokens
    return out


def source_metrics(batch: TrainBatch, rewards: torch.Tensor, seq_advantages: torch.Tensor) -> dict[str, float]:
    """rewards, seq_advantages: (B,) in batch row order."""
    out: dict[str, float] = {}
    response_lens = batch.loss_mask.sum(dim=1)  # (B,)
    mismatch = (batch.old_logprobs - batch.behaviour_logprobs).abs()  # (B, T)
    for source, code in SOURCE_CODES.items():
        rows = batch.sources == code  # (B,)
        name = source.value
        count = int(rows.sum())
        nan = float("nan")
        out[f"share/{name}"] = count / batch.num_seqs
        out[f"reward/{name}"] = float(rewards[rows].mean()) if count else nan
        out[f"accuracy/{name}"] = float((rewards[rows] >= 1.0).float().mean()) if count else nan
        out[f"response_len/{name}"] = float(response_lens[rows].mean()) if count else nan
        out[f"advantage/{name}"] = float(seq_advantages[rows].mean()) if count else nan
        out[f"logp_mismatch/{name}"] = masked_mean(mismatch[rows], batch.loss_mask[rows]) if count else nan
    out["reward/all"] = float(rewards.mean())
    out["accuracy/all"] = float((rewards >= 1.0).float().mean())
    return out


def mean_dicts(dicts: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for d in dicts for k in d})
    return {k: sum(d[k] for d in dicts if k in d) / sum(k in d for d in dicts) for k in keys}
