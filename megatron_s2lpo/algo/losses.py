"""Token-level PPO-clip policy loss for GRPO / DAPO, with KL penalty and entropy bonus.

All per-token tensors are (B, T) and aligned with `TrainBatch.tokens` (see types.py): entry
[b, t] is about token t given tokens[b, :t]; loss_mask is 1 on response tokens that enter the
loss.

Micro-batch invariance. Megatron runs a mini-batch as several micro-batches and SUMS their
gradients. So each micro-batch's loss here is a partial sum divided by a GLOBAL normaliser
computed once for the whole mini-batch with `loss_normalizer`:

    normalizer = loss_normalizer(minibatch_mask, config.loss_agg_mode)  # once
    for micro in micro_batches:
        loss, metrics = policy_loss(..., config=config, normalizer=normalizer)
        loss.backward()  # sum of micro losses == full-batch loss, exactly

With data parallelism the normaliser is the count over all ranks (all-reduce SUM of the per-rank
`loss_normalizer`), and the per-rank losses add up to the global loss; a DP gradient AVERAGE
must then be undone by the caller (multiply by the DP size).

Metrics are additive in the same way: every metric except `ratio_max` is a partial sum over the
micro-batch divided by the same global normaliser, so summing a metric over micro-batches (and
DP ranks) gives its full-batch value. `ratio_max` combines with max. Keys:
  loss-aggregated (so loss == pg_loss + kl_coef * kl_loss - entropy_coef * entropy_loss):
    pg_loss, kl_loss (with ref_logprobs), entropy_loss (with entropy)
  means (token means under token-mean; under the seq-mean modes, means over sequences of each
  sequence's token mean, which share the number-of-sequences normaliser):
    clip_frac (tokens whose clipped surrogate is active), dual_clip_frac, ppo_kl (old vs new),
    ratio_mean, kl, entropy, is_weight_mean
  ratio_max
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

Tensor = torch.Tensor

# Same bound as verl: exp(20) is far beyond any clip range and keeps the ratio finite.
_LOG_RATIO_BOUND = 20.0


# ----------------------------------------------------------------------------- aggregation


def _masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    # where, not multiply: garbage (inf/nan) at padded positions must not leak into the sum.
    return torch.where(mask > 0, values * mask, torch.zeros_like(values)).sum()


def _seq_token_means(values: Tensor, mask: Tensor) -> Tensor:
    """(B, T) -> (B,) mean over each sequence's loss tokens (0 for a sequence with none)."""
    per_seq = torch.where(mask > 0, values * mask, torch.zeros_like(values)).sum(dim=-1)
    return per_seq / mask.sum(dim=-1).clamp(min=1.0)


def _sum_of_token_values(values: Tensor, mask: Tensor) -> Tensor:
    return _masked_sum(values, mask)


def _sum_of_seq_means(values: Tensor, mask: Tensor) -> Tensor:
    return _seq_token_means(values, mask).sum()


def _count_tokens(mask: Tensor) -> Tensor:
    return mask.sum()


def _count_seqs(mask: Tensor) -> Tensor:
    # Sequences with no loss token (padding rows, fully masked samples) do not count.
    return (mask.sum(dim=-1) > 0).sum()


@dataclass(frozen=True, kw_only=True, slots=True)
class Aggregation:
    """How per-token values become one number: partial_sum(values, mask) / global count."""

    partial_sum: Callable[[Tensor, Tensor], Tensor]  # loss numerator of a (micro-)batch
    count: Callable[[Tensor], Tensor]  # the normaliser of a whole (mini-)batch
    metric_sum: Callable[[Tensor, Tensor], Tensor]  # numerator of mean-type metrics


AGGREGATIONS: dict[str, Aggregation] = {
    # mean over all loss tokens of the mini-batch (DAPO; verl's default)
    "token-mean": Aggregation(
        partial_sum=_sum_of_token_values, count=_count_tokens, metric_sum=_sum_of_token_values
    ),
    # per-sequence token sum, mean over sequences (Dr. GRPO style, without the constant)
    "seq-mean-token-sum": Aggregation(
        partial_sum=_sum_of_token_values, count=_count_seqs, metric_sum=_sum_of_seq_means
    ),
    # per-sequence token mean, mean over sequences (the original GRPO objective)
    "seq-mean-token-mean": Aggregation(
        partial_sum=_sum_of_seq_means, count=_count_seqs, metric_sum=_sum_of_seq_means
    ),
}


def _aggregation(name: str) -> Aggregation:
    agg = AGGREGATIONS.get(name)
    if agg is None:
        raise ValueError(f"algo.loss_agg_mode: unknown aggregation {name!r}; choose one of {sorted(AGGREGATIONS)}")
    return agg


def loss_normalizer(loss_mask: Tensor, agg: str) -> float:
    """Global normaliser of a whole (mini-)batch for aggregation `agg`.

    token-mean: number of loss tokens; seq-mean-*: number of sequences with at least one loss
    token. loss_mask: (B, T). Compute it once per mini-batch (sum it over DP ranks) and pass it
    to every micro-batch's loss.
    """
    if loss_mask.dim() != 2:
        raise ValueError(f"loss_mask must have shape (B, T), got {tuple(loss_mask.shape)}")
    return float(_aggregation(agg).count(loss_mask.to(torch.float64)))


# ----------------------------------------------------------------------------- KL estimators


def _kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    return logprobs - ref_logprobs


def _kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    return 0.5 * (logprobs - ref_logprobs).square()


def _kl_low_var(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    # k3 (Schulman): unbiased, non-negative, low variance; clamps as in verl's low_var_kl.
    log_ratio = (ref_logprobs - logprobs).clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    return (torch.exp(log_ratio) - log_ratio - 1.0).clamp(-10.0, 10.0)


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "k1": _kl_k1,
    "k2": _kl_k2,
    "low_var_kl": _kl_low_var,
}


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "low_var_kl") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from sampled-token log-probs; (B, T) -> (B, T)."""
    fn = KL_ESTIMATORS.get(estimator)
    if fn is None:
        raise ValueError(f"algo.kl_estimator: unknown estimator {estimator!r}; choose one of {sorted(KL_ESTIMATORS)}")
    return fn(logprobs, ref_logprobs)


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True, kw_only=True, slots=True)
class PolicyLossConfig:
    """Settings of `policy_loss`.

    The ratio is clipped to [1 - clip_low, 1 + clip_high] (DAPO clip-higher: clip_high = 0.28).
    clip_ratio_c is the dual-clip constant for negative advantages (the loss of a token with
    A < 0 is at most -A * clip_ratio_c); verl's default 3.0; None turns dual clip off.
    """

    clip_low: float = 0.2
    clip_high: float = 0.2
    clip_ratio_c: float | None = 3.0
    loss_agg_mode: str = "token-mean"
    kl_coef: float = 0.0
    kl_estimator: str = "low_var_kl"
    entropy_coef: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.clip_low < 1.0:
            raise ValueError(f"algo.clip_low must be in [0, 1) so that 1 - clip_low > 0, got {self.clip_low}")
        if not 0.0 <= self.clip_high < math.inf:
            raise ValueError(f"algo.clip_high must be a finite value >= 0, got {self.clip_high}")
        if self.clip_ratio_c is not None and not 1.0 < self.clip_ratio_c < math.inf:
            raise ValueError(
                f"algo.clip_ratio_c must be > 1 (dual clip) or None (off), got {self.clip_ratio_c}"
            )
        _aggregation(self.loss_agg_mode)
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(
                f"algo.kl_estimator: unknown estimator {self.kl_estimator!r}; choose one of {sorted(KL_ESTIMATORS)}"
            )
        for name in ("kl_coef", "entropy_coef"):
            value = getattr(self, name)
            if not 0.0 <= value < math.inf:
                raise ValueError(f"algo.{name} must be a finite value >= 0, got {value}")


# ----------------------------------------------------------------------------- policy loss


def truncated_importance_weights(old_logprobs: Tensor, behaviour_logprobs: Tensor, threshold: float) -> Tensor:
    """Per-token truncated importance weights min(pi_old / pi_behaviour, threshold), detached.

    Corrects for tokens sampled by a different engine or model (SGLang numerics, a stale
    learner server, the explorer) than the one the ratio is taken against. (B, T) -> (B, T).
    """
    if not threshold > 0.0:
        raise ValueError(f"threshold (importance-weight cap) must be > 0, got {threshold}")
    if old_logprobs.shape != behaviour_logprobs.shape:
        raise ValueError(
            f"old_logprobs {tuple(old_logprobs.shape)} and behaviour_logprobs "
            f"{tuple(behaviour_logprobs.shape)} must have the same shape"
        )
    log_ratio = (old_logprobs - behaviour_logprobs).detach()
    return torch.exp(log_ratio.clamp(max=math.log(threshold)))


# ----------------------------------------------------------------------------- train-inference mismatch
#
# The engine that sampled a token (SGLang in bf16 or FP8, a stale learner server) and the learner
# that recomputes old log-probs disagree; r_t = pi_old(x_t) / pi_behaviour(x_t) measures it per
# token. Each correction turns r into per-token weights that multiply the policy-gradient loss
# (detached; the loss normaliser is unchanged, so a masked token or sequence counts as a zero, as
# in NeMo-RL). `MISMATCH_CORRECTIONS` maps `algo.mismatch.correction` to its function.


@dataclass(frozen=True, kw_only=True, slots=True)
class MismatchCorrection:
    """Which correction and its band: `high` is the cap (TIS) or the band's upper end (masks,
    algo.is_threshold); `low` its lower end, None: 1 / high for the masks, no floor for TIS."""

    kind: str = "token_tis"
    high: float = 2.0
    low: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in MISMATCH_CORRECTIONS:
            raise ValueError(f"algo.mismatch.correction: unknown correction {self.kind!r}; choose one of "
                             f"{sorted(MISMATCH_CORRECTIONS)}")
        if not 0.0 < self.high < math.inf:
            raise ValueError(f"the importance-weight cap / band upper end must be > 0, got {self.high}")
        if self.low is not None and not 0.0 <= self.low < self.high:
            raise ValueError(f"algo.mismatch.low must be in [0, {self.high}) (below the upper end), got {self.low}")

    def band(self) -> tuple[float, float]:
        """(low, high) of the mask variants."""
        return (1.0 / self.high if self.low is None else self.low), self.high


def _token_tis(log_ratio: Tensor, mask: Tensor, c: MismatchCorrection) -> Tensor:
    # NeMo-RL truncated_importance_sampling_type="tis": clamp(r, min or 0, max)
    return torch.exp(log_ratio).clamp(min=c.low or 0.0, max=c.high)


def _icepop(log_ratio: Tensor, mask: Tensor, c: MismatchCorrection) -> Tensor:
    # NeMo-RL "icepop": r inside [low, high], 0 outside
    low, high = c.band()
    ratio = torch.exp(log_ratio)
    return torch.where((ratio >= low) & (ratio <= high), ratio, torch.zeros_like(ratio))


def _seq_log_ratio(log_ratio: Tensor, mask: Tensor, *, mean: bool) -> Tensor:
    """(B, T) -> (B, 1) sum (or mean) of log r over each sequence's loss tokens."""
    total = torch.where(mask > 0, log_ratio, torch.zeros_like(log_ratio)).sum(dim=-1, keepdim=True)
    return total / mask.sum(dim=-1, keepdim=True).clamp(min=1.0) if mean else total


def _seq_mask_tis(log_ratio: Tensor, mask: Tensor, c: MismatchCorrection) -> Tensor:
    # NeMo-RL "seq-mask-tis": a sequence whose geometric-mean ratio exp(mean_t log r_t) leaves
    # [low, high] gets weight 0; the others keep their raw token ratios
    low, high = c.band()
    geo = torch.exp(_seq_log_ratio(log_ratio, mask, mean=True))  # (B, 1)
    keep = (geo >= low) & (geo <= high)
    return torch.where(keep, torch.exp(log_ratio), torch.zeros_like(log_ratio))


def _seq_tis(log_ratio: Tensor, mask: Tensor, c: MismatchCorrection) -> Tensor:
    # slime mis.py level="sequence", mode="truncate": min(prod_t r_t, high) on every token of the
    # sequence, the log of the product clamped to +-20 first
    seq = _seq_log_ratio(log_ratio, mask, mean=False).clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    return torch.exp(seq).clamp(min=c.low or 0.0, max=c.high).expand_as(log_ratio)


MISMATCH_CORRECTIONS: dict[str, Callable[[Tensor, Tensor, MismatchCorrection], Tensor]] = {
    "token_tis": _token_tis,
    "icepop": _icepop,
    "seq_mask_tis": _seq_mask_tis,
    "seq_tis": _seq_tis,
}


def mismatch_weights(old_logprobs: Tensor, behaviour_logprobs: Tensor, loss_mask: Tensor,
                     correction: MismatchCorrection) -> Tensor:
    """Per-token weights of `correction` from r = exp(old - behaviour); (B, T) each, detached.

    Sequence-level variants read each row as one sequence (its loss-mask tokens). Positions
    outside the loss mask get weight 1 (they never enter the loss)."""
    if not old_logprobs.shape == behaviour_logprobs.shape == loss_mask.shape:
        raise ValueError(f"old_logprobs {tuple(old_logprobs.shape)}, behaviour_logprobs "
                         f"{tuple(behaviour_logprobs.shape)} and loss_mask {tuple(loss_mask.shape)} must have one shape")
    log_ratio = (old_logprobs - behaviour_logprobs).detach().clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    mask = loss_mask.to(log_ratio.dtype)
    weights = MISMATCH_CORRECTIONS[correction.kind](log_ratio, mask, correction)
    return torch.where(mask > 0, weights, torch.ones_like(weights))


def mismatch_stats(old_logprobs: Tensor, behaviour_logprobs: Tensor, loss_mask: Tensor,
                   correction: MismatchCorrection | None = None) -> dict[str, float]:
    """What the mismatch looks like over the loss tokens of (B, T) rows, and what `correction`
    does to it: ratio statistics of r = pi_old / pi_behaviour per token and per sequence (the
    geometric mean), the k3 estimate of KL(behaviour || old), and with a correction the mean
    weight, the share of tokens it zeroes (masked_frac), of whole sequences (masked_seq_frac)
    and of tokens whose weight it changed otherwise (truncated_frac). Empty rows are skipped."""
    mask = loss_mask > 0
    if not bool(mask.any()):
        return {}
    log_ratio = (old_logprobs - behaviour_logprobs).double().clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    ratio = log_ratio.exp()
    rows = mask.any(dim=-1)
    geo = _seq_log_ratio(log_ratio, mask.double(), mean=True)[rows, 0].exp()
    out = {"ratio_mean": float(ratio[mask].mean()), "ratio_min": float(ratio[mask].min()),
           "ratio_max": float(ratio[mask].max()), "abs_log_ratio": float(log_ratio[mask].abs().mean()),
           "k3_kl": float((ratio - log_ratio - 1)[mask].mean()), "seq_ratio_mean": float(geo.mean()),
           "seq_ratio_min": float(geo.min()), "seq_ratio_max": float(geo.max())}
    if correction is not None:
        weights = mismatch_weights(old_logprobs.double(), behaviour_logprobs.double(), loss_mask, correction)
        # the weight before any cap: the token ratio, or for seq_tis the sequence's product
        raw = (_seq_log_ratio(log_ratio, mask.double(), mean=False).clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
               .exp().expand_as(ratio) if correction.kind == "seq_tis" else ratio)
        zero = (weights == 0) & mask
        out.update(weight_mean=float(weights[mask].mean()), masked_frac=float(zero[mask].double().mean()),
                   masked_seq_frac=float((zero.sum(-1) == mask.sum(-1))[rows].double().mean()),
                   truncated_frac=float((~zero & ~torch.isclose(weights, raw))[mask].double().mean()))
    return out


def _check_token_tensors(logprobs: Tensor, named: dict[str, Tensor | None], normalizer: float) -> None:
    if logprobs.dim() != 2 or not logprobs.is_floating_point():
        raise ValueError(
            f"logprobs must be a float tensor of shape (B, T), got {logprobs.dtype} {tuple(logprobs.shape)}"
        )
    for name, value in named.items():
        if value is not None and value.shape != logprobs.shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(logprobs.shape)} like logprobs")
    if not 0.0 < float(normalizer) < math.inf:
        raise ValueError(
            f"normalizer must be > 0, got {normalizer}; pass loss_normalizer(mask, agg) of the whole "
            "mini-batch (a mini-batch without loss tokens has nothing to train on)"
        )


def _clipped_surrogate(ratio: Tensor, advantages: Tensor, config: PolicyLossConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token PPO-clip loss with optional dual clip; also where each clip is active."""
    surr = -advantages * ratio
    surr_clipped = -advantages * ratio.clamp(1.0 - config.clip_low, 1.0 + config.clip_high)
    loss = torch.maximum(surr, surr_clipped)
    clip_active = surr_clipped > surr
    if config.clip_ratio_c is None:
        return loss, clip_active, torch.zeros_like(clip_active)
    # Dual clip: for A < 0 a huge ratio would give an unbounded loss; cap it at -A * c.
    surr_dual = -advantages * config.clip_ratio_c
    negative = advantages < 0
    dual_active = negative & (loss > surr_dual)
    return torch.where(negative, torch.minimum(loss, surr_dual), loss), clip_active, dual_active


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    *,
    config: PolicyLossConfig,
    normalizer: float,
    ref_logprobs: Tensor | None = None,
    entropy: Tensor | None = None,
    is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip policy loss of one micro-batch: (loss, metrics); see the module docstring.

    logprobs: (B, T) current policy log-probs of the sampled tokens (carries the gradient);
    old_logprobs: (B, T) log-probs the ratio is taken against; advantages: (B, T) (a sequence's
    advantage broadcast over its tokens); loss_mask: (B, T) 1 on tokens in the loss;
    ref_logprobs: (B, T) reference log-probs, required when config.kl_coef > 0;
    entropy: (B, T) per-token entropy of the current policy, required when config.entropy_coef > 0;
    is_weights: (B, T) per-token importance weights (see `truncated_importance_weights`) that
    multiply the policy-gradient loss, detached;
    normalizer: `loss_normalizer(mask, config.loss_agg_mode)` of the whole mini-batch.
    """
    named = {
        "old_logprobs": old_logprobs, "advantages": advantages, "loss_mask": loss_mask,
        "ref_logprobs": ref_logprobs, "entropy": entropy, "is_weights": is_weights,
    }  # fmt: skip
    _check_token_tensors(logprobs, named, normalizer)
    if config.kl_coef > 0 and ref_logprobs is None:
        raise ValueError("algo.kl_coef > 0 needs ref_logprobs (reference-model log-probs); set kl_coef=0 or pass them")
    if config.entropy_coef > 0 and entropy is None:
        raise ValueError("algo.entropy_coef > 0 needs the per-token entropy; set entropy_coef=0 or pass it")
    agg = _aggregation(config.loss_agg_mode)
    mask = loss_mask.to(logprobs.dtype)
    norm = float(normalizer)

    def loss_term(values: Tensor) -> Tensor:
        return agg.partial_sum(values, mask) / norm

    def mean_metric(values: Tensor) -> Tensor:
        return (agg.metric_sum(values.detach().to(logprobs.dtype), mask) / norm).detach()

    log_ratio = (logprobs - old_logprobs).clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    ratio = torch.exp(log_ratio)  # (B, T)
    pg_per_token, clip_active, dual_active = _clipped_surrogate(ratio, advantages, config)
    if is_weights is not None:
        pg_per_token = pg_per_token * is_weights.detach()
    pg_loss = loss_term(pg_per_token)
    loss = pg_loss

    live_ratio = torch.where(mask > 0, ratio.detach(), torch.zeros_like(ratio))
    metrics = {
        "pg_loss": pg_loss.detach(),
        "clip_frac": mean_metric(clip_active),
        "dual_clip_frac": mean_metric(dual_active),
        "ppo_kl": mean_metric(-log_ratio),
        "ratio_mean": mean_metric(ratio),
        "ratio_max": live_ratio.max() if live_ratio.numel() else live_ratio.new_zeros(()),
    }
    if is_weights is not None:
        metrics["is_weight_mean"] = mean_metric(is_weights)
    if ref_logprobs is not None:
        kl_per_token = kl_penalty(logprobs, ref_logprobs, config.kl_estimator)
        kl_loss = loss_term(kl_per_token)
        if config.kl_coef > 0:
            loss = loss + config.kl_coef * kl_loss
        metrics["kl_loss"] = kl_loss.detach()
        metrics["kl"] = mean_metric(kl_per_token)
    if entropy is not None:
        entropy_loss = loss_term(entropy)
        if config.entropy_coef > 0:
            loss = loss - config.entropy_coef * entropy_loss
        metrics["entropy_loss"] = entropy_loss.detach()
        metrics["entropy"] = mean_metric(entropy)
    return loss, metrics
