"""Distillation losses of the sparse-to-dense bridge: forward-KL warmup and on-policy distillation.

p_S is the trainable student, p_T the frozen teacher. Per-token tensors are (B, T) and aligned
with `TrainBatch.tokens` (types.py): entry [b, t] is about token t given tokens[b, :t];
loss_mask is 1 on the tokens that enter the loss.

Forward-KL warmup (`forward_kl_loss`), on TEACHER-generated completions x ~ p_T:

    KL(p_T || p_S) = E_{x ~ p_T}[log p_T(x) - log p_S(x)] = CE(p_T, p_S) - H(p_T)

H(p_T) does not depend on the student, so the per-token loss is the cross-entropy:
  sampled tokens only:  -log p_S(x_t)  (a one-sample estimate of CE; plain SFT on the teacher)
  teacher top-k:        -sum_k q_k log p_S(k | ctx), over the teacher's top-k ids at position t.
The target q is the teacher distribution RENORMALISED over its top-k: q = softmax of the K
teacher log-probs, q_k = p_T(k) / sum_{j in top-k} p_T(j); the teacher's tail mass is dropped.
The student side is NOT renormalised: log p_S(k) uses the full-vocabulary normaliser
(learner/logprobs.py `token_topk_logprobs`), so the loss also moves student mass off the
non-top-k ids. With K = V the loss is the exact CE and the metric `fkl_kl` the exact KL.

On-policy distillation (OPD): the student samples x ~ p_S and the teacher scores the sampled
tokens. The objective is the reverse KL at every visited prefix, with discount 0 (a token's
effect on later positions' KL is ignored, as in the public OPD recipes). With
k1_t = log p_S(x_t) - log p_T(x_t):

    grad KL(p_S(.|ctx) || p_T(.|ctx)) = E_{x ~ p_S}[k1(x) grad log p_S(x)]

(the "+1" of d(p log p) vanishes because E[grad log p_S] = 0). Two ways to follow it:

  advantage (default): `opd_token_advantages` gives A_t = coef * (log p_T(x_t) - log p_old(x_t)),
    the negative reverse-KL estimate as a dense per-token reward, for the PPO-clip `policy_loss`
    (the on-policy distillation recipe of Tinker, slime and verl). At ratio 1 the PPO gradient
    -A_t grad log p_S equals coef * k1_t grad log p_S, so on the first, on-policy mini-batch
    both modes give the same gradient (tests/unit/test_distill_losses.py checks it). It is the
    default because it reuses the whole GRPO path: the clipped ratio keeps the later
    mini-batches of the same rollout safe, truncated IS weights correct the engine/learner
    mismatch, and the dense advantage adds to the sparse GRPO sequence advantage.
  loss: `reverse_kl_loss` minimises coef * sg(k1_t) * log p_S(x_t) directly: no ratio, no clip,
    no old log-probs. For strictly on-policy steps (one mini-batch per rollout batch), and as a
    reference for the advantage path; reusing its samples for more steps is biased.

Aggregation and micro-batch invariance follow algo/losses.py exactly: each call returns a
partial sum over its micro-batch divided by the GLOBAL `loss_normalizer` of the whole mini-batch,
so losses, gradients and every metric add up over micro-batches (and DP ranks).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from megatron_s2lpo.algo.losses import _LOG_RATIO_BOUND, _aggregation, _check_token_tensors

Tensor = torch.Tensor

OPD_MODES = ("advantage", "loss")  # opd_token_advantages + policy_loss, or reverse_kl_loss


def _live(values: Tensor, mask: Tensor) -> Tensor:
    """Zero outside the mask, so fillers (-inf, -1e9) never reach arithmetic (no inf * 0 in backward)."""
    return torch.where(mask > 0, values, torch.zeros_like(values))


def _reducers(loss_agg_mode: str, mask: Tensor, normalizer: float) -> tuple[Callable, Callable]:
    """(loss_term, mean_metric) of one micro-batch: partial sums over the global normaliser."""
    agg = _aggregation(loss_agg_mode)
    norm = float(normalizer)

    def loss_term(values: Tensor) -> Tensor:
        return agg.partial_sum(values, mask) / norm

    def mean_metric(values: Tensor) -> Tensor:
        return (agg.metric_sum(values.detach(), mask) / norm).detach()

    return loss_term, mean_metric


def _check_coef(coef: float, field: str) -> None:
    if not 0.0 <= coef < math.inf:
        raise ValueError(f"coef ({field}) must be a finite value >= 0, got {coef}")


def _check_topk(logprobs: Tensor, student: Tensor | None, teacher: Tensor | None) -> None:
    if (student is None) != (teacher is None):
        raise ValueError("student_topk_logprobs and teacher_topk_logprobs come together: pass both "
                         "(top-k forward KL) or neither (NLL of the sampled tokens)")
    if student is None:
        return
    if student.dim() != 3 or student.shape[:2] != logprobs.shape or student.shape[2] < 1:
        raise ValueError(f"student_topk_logprobs has shape {tuple(student.shape)}, expected "
                         f"{tuple(logprobs.shape)} + (K,) with K >= 1 like logprobs")
    if teacher.shape != student.shape:
        raise ValueError(f"teacher_topk_logprobs has shape {tuple(teacher.shape)}, expected "
                         f"{tuple(student.shape)} like student_topk_logprobs")


def forward_kl_loss(
    logprobs: Tensor,
    loss_mask: Tensor,
    *,
    normalizer: float,
    loss_agg_mode: str = "token-mean",
    student_topk_logprobs: Tensor | None = None,
    teacher_topk_logprobs: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward-KL warmup loss of one micro-batch of teacher completions: (loss, metrics).

    logprobs: (B, T) student log-probs of the tokens (carries the gradient); loss_mask: (B, T);
    student_topk_logprobs: (B, T, K) student log-probs at the teacher's top-k ids (carries the
    gradient), teacher_topk_logprobs: (B, T, K) the teacher's log-probs of those ids (any
    filler outside the loss mask, -inf included; -inf inside a row means "no candidate");
    normalizer: `loss_normalizer(mask, loss_agg_mode)` of the whole mini-batch.
    Per-token loss: -logprobs without top-k, else -sum_k q_k log p_S(k) with q the teacher's
    top-k distribution renormalised over the K ids (module docstring).
    Metrics: nll (mean -logprobs), fkl_ce (mean top-k cross-entropy), fkl_kl (mean top-k
    forward KL sum_k q_k (log q_k - log p_S(k))), distill_loss (the loss); additive like
    `policy_loss`'s.
    """
    _check_token_tensors(logprobs, {"loss_mask": loss_mask}, normalizer)
    _check_topk(logprobs, student_topk_logprobs, teacher_topk_logprobs)
    mask = loss_mask.to(logprobs.dtype)
    loss_term, mean_metric = _reducers(loss_agg_mode, mask, normalizer)
    nll = -_live(logprobs, mask)  # (B, T)
    metrics = {"nll": mean_metric(nll)}
    per_token = nll
    if student_topk_logprobs is not None:
        live = mask.unsqueeze(-1) > 0  # (B, T, 1)
        student = torch.where(live, student_topk_logprobs, torch.zeros_like(student_topk_logprobs))
        teacher = teacher_topk_logprobs.detach().to(student.dtype)
        # Outside the mask: a uniform dummy; inside: -inf -> the lowest float so that a row of
        # fillers cannot make log_softmax NaN.
        teacher = torch.where(live, teacher.clamp(min=torch.finfo(student.dtype).min), torch.zeros_like(teacher))
        log_q = torch.log_softmax(teacher, dim=-1)  # (B, T, K)
        q = log_q.exp()
        weighted = torch.where(q > 0, q * student, torch.zeros_like(student))  # 0 * (-inf) must stay 0
        per_token = -weighted.sum(dim=-1)  # (B, T)
        kl = (torch.where(q > 0, q * log_q, torch.zeros_like(q)) - weighted.detach()).sum(dim=-1)
        metrics["fkl_ce"] = mean_metric(per_token)
        metrics["fkl_kl"] = mean_metric(kl)
    loss = loss_term(per_token)
    metrics["distill_loss"] = loss.detach()
    return loss, metrics


def opd_token_advantages(
    old_logprobs: Tensor,
    teacher_logprobs: Tensor,
    loss_mask: Tensor,
    *,
    coef: float = 1.0,
    clip: float | None = None,
) -> Tensor:
    """Dense OPD advantages coef * (log p_T - log p_old) on loss tokens, 0 elsewhere; (B, T), detached.

    old_logprobs: (B, T) log-probs of the sampling policy (the ratio's denominator in
    `policy_loss`); teacher_logprobs: (B, T) the teacher's log-probs of the same tokens (any
    filler outside the loss mask); clip: cap |A_t| at clip (None: no cap). Add the GRPO sequence
    advantage (times a weight) to the result to blend the sparse reward in.
    """
    if old_logprobs.dim() != 2 or not old_logprobs.is_floating_point():
        raise ValueError(f"old_logprobs must be a float tensor of shape (B, T), got {old_logprobs.dtype} "
                         f"{tuple(old_logprobs.shape)}")
    for name, value in (("teacher_logprobs", teacher_logprobs), ("loss_mask", loss_mask)):
        if value.shape != old_logprobs.shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(old_logprobs.shape)} "
                             "like old_logprobs")
    _check_coef(coef, "algo.distill.opd_coef")
    if clip is not None and not 0.0 < clip < math.inf:
        raise ValueError(f"clip (algo.distill.opd_clip) must be > 0 or None (no cap), got {clip}")
    old = old_logprobs.detach()
    diff = teacher_logprobs.detach().to(old.dtype) - old
    advantages = torch.where(loss_mask > 0, coef * diff, torch.zeros_like(diff))
    if clip is not None:
        advantages = advantages.clamp(-clip, clip)
    return advantages


def reverse_kl_loss(
    logprobs: Tensor,
    teacher_logprobs: Tensor,
    loss_mask: Tensor,
    *,
    normalizer: float,
    loss_agg_mode: str = "token-mean",
    coef: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Direct on-policy reverse-KL loss of one micro-batch of student samples: (loss, metrics).

    logprobs: (B, T) student log-probs of its own sampled tokens (carries the gradient);
    teacher_logprobs: (B, T) the teacher's log-probs of those tokens (any filler outside the
    loss mask); normalizer: `loss_normalizer(mask, loss_agg_mode)` of the whole mini-batch.
    The gradient is that of coef * sg(k1_t) * log p_S(x_t), k1 = logprobs - teacher_logprobs:
    the on-policy reverse-KL policy gradient. The VALUE is coef * k1 aggregated (the reverse-KL
    estimate itself) rather than the uninformative k1 * log p_S: the per-token surrogate is
    k1 + k1 * (log p_S - sg(log p_S)), whose second term is 0 with the same gradient.
    Metrics: reverse_kl (mean k1), reverse_kl_k3 (mean k3 = r - 1 - log r, r = p_T / p_S, the
    non-negative low-variance estimator; log r bounded at 20 like policy_loss's ratio),
    distill_loss (the loss).
    """
    _check_token_tensors(logprobs, {"teacher_logprobs": teacher_logprobs, "loss_mask": loss_mask}, normalizer)
    _check_coef(coef, "the reverse-KL loss weight")
    mask = loss_mask.to(logprobs.dtype)
    loss_term, mean_metric = _reducers(loss_agg_mode, mask, normalizer)
    student = _live(logprobs, mask)  # (B, T)
    k1 = student.detach() - _live(teacher_logprobs.detach().to(logprobs.dtype), mask)
    surrogate = k1 + k1 * (student - student.detach())
    loss = loss_term(coef * surrogate)
    log_r = (-k1).clamp(max=_LOG_RATIO_BOUND)
    metrics = {
        "reverse_kl": mean_metric(k1),
        "reverse_kl_k3": mean_metric(torch.exp(log_r) - 1.0 - log_r),
        "distill_loss": loss.detach(),
    }
    return loss, metrics
