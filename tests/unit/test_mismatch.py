"""Train-inference mismatch corrections (algo.losses.MISMATCH_CORRECTIONS) against the peers'
code they follow, transcribed here as slow references:

  token_tis, icepop, seq_mask_tis: NeMo-RL `nemo_rl/algorithms/loss/loss_functions.py`,
      ClippedPGLossFn, truncated_importance_sampling_type "tis" / "icepop" / "seq-mask-tis";
  seq_tis: slime `examples/train_infer_mismatch_helper/mis.py`, compute_mis_weights with
      mis_level="sequence", mis_mode="truncate" (one 1-D tensor per sequence).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from megatron_s2lpo.algo import losses
from megatron_s2lpo.algo.losses import (MISMATCH_CORRECTIONS, MismatchCorrection, PolicyLossConfig, loss_normalizer,
                                        mismatch_stats, mismatch_weights, policy_loss, truncated_importance_weights)
from megatron_s2lpo.config import algo as algo_cfg
from megatron_s2lpo.config.algo import AlgoConfig, MismatchConfig
from megatron_s2lpo.learner.step import LossSpec, importance_weights
from megatron_s2lpo.types import SOURCE_CODES, Source


def random_case(seed: int, scale: float = 0.3, rows: int = 7, cols: int = 13, row_scale: float = 0.0):
    """old / behaviour log-probs with a mismatch of `scale` per token (+ `row_scale` per row),
    right-padded rows, one empty row."""
    gen = torch.Generator().manual_seed(seed)
    behaviour = -torch.rand(rows, cols, generator=gen, dtype=torch.float64) * 3
    old = behaviour + scale * torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    old = old + row_scale * torch.randn(rows, 1, generator=gen, dtype=torch.float64)
    lengths = torch.randint(1, cols + 1, (rows,), generator=gen)
    mask = (torch.arange(cols)[None] < lengths[:, None]).double()
    mask[:, 0] = 0  # the first token is never in the loss
    mask[rows - 1] = 0  # a row without loss tokens (padding)
    return old, behaviour, mask


# ----- the references -----


def nemo_masked_mean(values, mask, dim=None):
    return (values * mask).sum() / mask.sum() if dim is None else (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def nemo_rl(old, behaviour, mask, kind, ratio_max, ratio_min):
    """NeMo-RL's block (prev_logprobs = old, generation_logprobs = behaviour, token_mask = mask)."""
    weights = torch.nan_to_num(torch.exp(old - behaviour), nan=0.0, posinf=0.0, neginf=0.0)
    if kind == "tis":
        return torch.clamp(weights, min=0.0 if ratio_min is None else ratio_min, max=ratio_max)
    if kind == "icepop":
        kept = (weights >= ratio_min) & (weights <= ratio_max)
        return torch.where(kept, weights, torch.zeros_like(weights))
    log_is_ratio = torch.nan_to_num(old - behaviour, nan=0.0, posinf=0.0, neginf=0.0)
    geo = torch.exp(nemo_masked_mean(log_is_ratio, mask, dim=-1))
    kept = ((geo >= ratio_min) & (geo <= ratio_max)).double()
    return weights * kept.unsqueeze(-1)


def slime_seq_tis(old, behaviour, mask, upper):
    """slime's loop over sequences: level "sequence" = masked_sum of the log ratio, clamped to
    +-20, exp, then truncate = clamp(0, upper) * loss_mask."""
    out = torch.zeros_like(old)
    for b in range(old.shape[0]):
        seq = (old[b] - behaviour[b]) * mask[b]
        log_w = torch.clamp(seq.sum().expand_as(seq), min=-20.0, max=20.0)
        out[b] = torch.exp(log_w).clamp(0, upper) * mask[b]
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind,nemo_kind,low,high", [
    ("token_tis", "tis", None, 2.0), ("token_tis", "tis", 0.5, 1.5),
    ("icepop", "icepop", None, 1.5), ("icepop", "icepop", 0.8, 1.1),
    ("seq_mask_tis", "seq-mask-tis", None, 1.1), ("seq_mask_tis", "seq-mask-tis", 0.95, 1.02)])
def test_token_and_masked_corrections_equal_nemo_rl(seed, kind, nemo_kind, low, high):
    seq = kind == "seq_mask_tis"
    old, behaviour, mask = random_case(seed, scale=0.05 if seq else 0.3, rows=16, row_scale=0.08 if seq else 0.0)
    ours = mismatch_weights(old, behaviour, mask, MismatchCorrection(kind=kind, high=high, low=low))
    ref_low = low if low is not None or kind == "token_tis" else 1 / high
    ref = nemo_rl(old, behaviour, mask, nemo_kind, high, ref_low)
    on = mask > 0
    assert torch.allclose(ours[on], ref[on], rtol=1e-12, atol=0)
    assert bool((ours[~on] == 1).all())  # outside the loss: weight 1, never read
    if kind != "token_tis":
        assert bool((ours[on] == 0).any()) and bool((ours[on] > 0).any())  # the band bites in these cases


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("high", [1.5, 3.0, 1e6])
def test_sequence_tis_equals_slime(seed, high):
    old, behaviour, mask = random_case(seed, scale=0.1)
    ours = mismatch_weights(old, behaviour, mask, MismatchCorrection(kind="seq_tis", high=high))
    ref = slime_seq_tis(old, behaviour, mask, high)
    on = mask > 0
    assert torch.allclose(ours[on], ref[on], rtol=1e-12, atol=0)


def test_token_tis_is_the_earlier_truncated_weight():
    old, behaviour, mask = random_case(0, scale=1.0)
    ours = mismatch_weights(old, behaviour, mask, MismatchCorrection(high=2.0))
    assert torch.allclose(ours[mask > 0], truncated_importance_weights(old, behaviour, 2.0)[mask > 0])


def test_sequence_corrections_read_each_row_alone():
    old, behaviour, mask = random_case(1)
    for kind in ("seq_mask_tis", "seq_tis"):
        c = MismatchCorrection(kind=kind, high=1.3)
        full = mismatch_weights(old, behaviour, mask, c)
        for b in range(old.shape[0] - 1):  # padding and the other rows change nothing
            alone = mismatch_weights(old[b:b + 1, :9], behaviour[b:b + 1, :9], mask[b:b + 1, :9], c)
            n = int(mask[b, :9].sum())
            if n == int(mask[b].sum()):  # the row fits in 9 columns
                assert torch.allclose(alone[0, :9][mask[b, :9] > 0], full[b, :9][mask[b, :9] > 0])


def test_a_sequence_outside_the_band_is_masked_whole():
    behaviour = torch.full((2, 5), -1.0, dtype=torch.float64)
    old = behaviour.clone()
    old[0, 1:] += math.log(1.05)  # geometric mean 1.05: outside [1/1.02, 1.02]
    old[1, 1:] += torch.tensor([0.5, -0.5, 0.0, 0.0], dtype=torch.float64)  # geometric mean 1, tokens far off
    mask = torch.ones(2, 5, dtype=torch.float64)
    mask[:, 0] = 0
    w = mismatch_weights(old, behaviour, mask, MismatchCorrection(kind="seq_mask_tis", high=1.02))
    assert bool((w[0, 1:] == 0).all())
    assert torch.allclose(w[1, 1:], torch.exp(old[1, 1:] - behaviour[1, 1:]))  # kept: raw token ratios
    icepop = mismatch_weights(old, behaviour, mask, MismatchCorrection(kind="icepop", high=1.02))
    assert icepop[1, 1:].tolist() == [0.0, 0.0, 1.0, 1.0] and bool((icepop[0, 1:] == 0).all())


def test_the_policy_loss_with_weights_is_nemo_rls_token_level_loss():
    old, behaviour, mask = random_case(2, scale=0.2)
    gen = torch.Generator().manual_seed(5)
    logprobs = (old + 0.1 * torch.randn(old.shape, generator=gen, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(old.shape, generator=gen, dtype=torch.float64)
    cfg = PolicyLossConfig(clip_ratio_c=None)
    w = mismatch_weights(old, behaviour, mask, MismatchCorrection(kind="icepop", high=1.2))
    loss, _ = policy_loss(logprobs, old, adv, mask, config=cfg, normalizer=loss_normalizer(mask, "token-mean"),
                          is_weights=w)
    ratio = torch.exp(logprobs - old)
    clip_loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    assert torch.allclose(loss, nemo_masked_mean(w * clip_loss, mask))  # masked tokens count as zeros


def test_stats_move_with_an_injected_mismatch():
    rows = []
    for scale in (0.0, 0.02, 0.1, 0.5):
        old, behaviour, mask = random_case(3, scale=scale, rows=64, cols=40)
        rows.append({k: mismatch_stats(old, behaviour, mask, MismatchCorrection(kind=k, high=1.1))
                     for k in MISMATCH_CORRECTIONS})
    none = rows[0]
    assert all(s["masked_frac"] == 0 and s["truncated_frac"] == 0 and s["ratio_max"] == 1 for s in none.values())
    for a, b in zip(rows, rows[1:]):  # every statistic grows with the injected gap
        for k in ("icepop", "seq_mask_tis"):
            assert b[k]["masked_frac"] >= a[k]["masked_frac"]
        assert b["token_tis"]["truncated_frac"] >= a["token_tis"]["truncated_frac"]
        assert b["token_tis"]["k3_kl"] > a["token_tis"]["k3_kl"] and b["token_tis"]["ratio_max"] > a["token_tis"]["ratio_max"]
    assert rows[-1]["token_tis"]["truncated_frac"] > 0.3 and rows[-1]["icepop"]["masked_frac"] > 0.7
    assert rows[-1]["seq_mask_tis"]["masked_seq_frac"] > 0.3 and rows[1]["seq_mask_tis"]["masked_seq_frac"] == 0


def test_learner_rows_get_the_correction_explorer_rows_token_tis():
    old, behaviour, mask = random_case(4, scale=0.3, rows=4)
    learner, explorer = SOURCE_CODES[Source.LEARNER], SOURCE_CODES[Source.EXPLORER]
    micro = SimpleNamespace(behaviour_logprobs=behaviour, loss_mask=mask,
                            sources=torch.tensor([learner, explorer, learner, explorer]))
    icepop = MismatchCorrection(kind="icepop", high=1.2)
    spec = LossSpec(loss_config=PolicyLossConfig(), normalizer=1.0, num_microbatches=1, dp_size=1, vocab_size=8,
                    tp_group=None, is_threshold=1.2, is_correction=icepop)
    w = importance_weights(micro, old, spec)
    assert torch.equal(w[0], mismatch_weights(old, behaviour, mask, icepop)[0])
    assert torch.equal(w[1], mismatch_weights(old, behaviour, mask, MismatchCorrection(high=1.2))[1])
    spec.is_sources = (learner,)  # recompute mode: the explorer's rows keep weight 1 (the paper's objective)
    w = importance_weights(micro, old, spec)
    assert bool((w[1] == 1).all()) and bool((w[3] == 1).all()) and torch.equal(w[2], mismatch_weights(
        old, behaviour, mask, icepop)[2])


def test_mismatch_config():
    assert set(algo_cfg.MISMATCH_CORRECTIONS) == set(losses.MISMATCH_CORRECTIONS)
    assert AlgoConfig(mismatch=MismatchConfig(correction="seq_mask_tis", low=0.99), is_threshold=1.01)
    with pytest.raises(ValueError, match="algo.mismatch.correction must be one of"):
        MismatchConfig(correction="mis")
    with pytest.raises(ValueError, match="needs algo.is_threshold"):
        AlgoConfig(mismatch=MismatchConfig(correction="icepop"), is_threshold=None)
    with pytest.raises(ValueError, match="must be below algo.is_threshold"):
        AlgoConfig(mismatch=MismatchConfig(correction="icepop", low=3.0), is_threshold=2.0)
    with pytest.raises(ValueError, match="unknown correction"):
        MismatchCorrection(kind="geo")
