"""Distillation losses against float64 loop references built from full-vocabulary logits.

Each loss runs on log-probs taken from float64 student logits (B, T, V) (position t's row is
the distribution of token t, i.e. already aligned; the shift is tested with the learner's
log-prob functions). The references loop over tokens with an independent formula
(z_i - log sum_j exp z_j, q_k = exp(t_k) / sum_j exp(t_j)) and get their gradient w.r.t. the
logits from autograd. Also: top-k with K = V is the exact forward KL; micro-batch invariance;
advantage mode through `policy_loss` has the gradient of loss mode on on-policy data.
"""

import math

import pytest
import torch

from megatron_s2lpo.algo.distill import OPD_MODES, forward_kl_loss, opd_token_advantages, reverse_kl_loss
from megatron_s2lpo.algo.losses import AGGREGATIONS, PolicyLossConfig, loss_normalizer, policy_loss

AGG_MODES = sorted(AGGREGATIONS)
F64 = torch.float64


# ----------------------------------------------------------------------------- data


def make_case(seed: int, num_seqs: int = 6, seq_len: int = 9, vocab: int = 11, num_k: int = 4):
    """Student / teacher logits, sampled tokens, the teacher's top-k ids and a loss mask."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(num_seqs, seq_len, vocab, generator=gen, dtype=F64) * 1.5
    teacher = student + torch.randn(num_seqs, seq_len, vocab, generator=gen, dtype=F64)  # close but not equal
    tokens = torch.randint(0, vocab, (num_seqs, seq_len), generator=gen)
    topk_ids = torch.argsort(teacher, dim=-1, descending=True)[..., :num_k]  # (B, T, K)
    start = torch.randint(1, 4, (num_seqs, 1), generator=gen)
    stop = start + torch.randint(0, seq_len - 3, (num_seqs, 1), generator=gen)
    pos = torch.arange(seq_len)
    mask = ((pos >= start) & (pos < stop)).to(F64)
    mask[0, 1:] = 1.0  # a row with many tokens
    mask[1] = 0.0  # and one without any
    return student, teacher, tokens, topk_ids, mask


def gather(logp_all, ids):
    return logp_all.gather(-1, ids)


def code_inputs(student_logits, teacher_logits, tokens, topk_ids):
    """What the learner hands the losses: (B, T) log-probs and (B, T, K) top-k log-probs."""
    logp_s = torch.log_softmax(student_logits, dim=-1)
    logp_t = torch.log_softmax(teacher_logits, dim=-1)
    return (gather(logp_s, tokens[..., None])[..., 0], gather(logp_s, topk_ids),
            gather(logp_t, tokens[..., None])[..., 0], gather(logp_t, topk_ids))


# ----------------------------------------------------------------------------- reference


def ref_logp(logits_row, i):
    """log softmax(logits_row)[i], written out."""
    return logits_row[i] - torch.log(torch.exp(logits_row).sum())


def ref_aggregate(per_token, mask, mode):
    """per_token: {(b, t): scalar} on mask tokens -> (loss-style sum, metric-style mean)."""
    rows = {}
    for (b, t), value in per_token.items():
        rows.setdefault(b, []).append(value)
    num_tokens = sum(len(r) for r in rows.values())
    loss = metric = torch.zeros((), dtype=F64)
    for row in rows.values():
        if mode == "token-mean":
            loss_scale = metric_scale = 1.0 / num_tokens
        elif mode == "seq-mean-token-sum":
            loss_scale, metric_scale = 1.0 / len(rows), 1.0 / (len(rows) * len(row))
        else:  # seq-mean-token-mean
            loss_scale = metric_scale = 1.0 / (len(rows) * len(row))
        for value in row:
            loss = loss + value * loss_scale
            metric = metric + value * metric_scale
    return loss, metric


def live_tokens(mask):
    return [(b, t) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t] > 0]


def ref_forward_kl(student_logits, teacher_logits, tokens, topk_ids, mask, mode, top_k: bool):
    """(loss, {metric: value}) of the forward-KL warmup, one token at a time."""
    nll, ce, kl = {}, {}, {}
    for b, t in live_tokens(mask):
        z_s, z_t = student_logits[b, t], teacher_logits[b, t]
        nll[b, t] = -ref_logp(z_s, tokens[b, t].item())
        if top_k:
            ids = topk_ids[b, t].tolist()
            t_lp = [ref_logp(z_t, i).detach() for i in ids]  # the teacher is frozen
            total = sum(torch.exp(x) for x in t_lp)
            q = [torch.exp(x) / total for x in t_lp]
            s_lp = [ref_logp(z_s, i) for i in ids]
            ce[b, t] = -sum(qk * sk for qk, sk in zip(q, s_lp))
            kl[b, t] = sum(qk * (torch.log(qk) - sk) for qk, sk in zip(q, s_lp))
    metrics = {"nll": ref_aggregate(nll, mask, mode)[1]}
    if top_k:
        metrics["fkl_ce"] = ref_aggregate(ce, mask, mode)[1]
        metrics["fkl_kl"] = ref_aggregate(kl, mask, mode)[1]
    return ref_aggregate(ce if top_k else nll, mask, mode)[0], metrics


def run_code_forward_kl(case, mode, top_k: bool):
    student_logits, teacher_logits, tokens, topk_ids, mask = case
    x = student_logits.clone().requires_grad_(True)
    lp, s_topk, _, t_topk = code_inputs(x, teacher_logits, tokens, topk_ids)
    kwargs = dict(student_topk_logprobs=s_topk, teacher_topk_logprobs=t_topk) if top_k else {}
    loss, metrics = forward_kl_loss(lp, mask, normalizer=loss_normalizer(mask, mode), loss_agg_mode=mode, **kwargs)
    loss.backward()
    return loss, metrics, x.grad


# ----------------------------------------------------------------------------- forward KL


@pytest.mark.parametrize("top_k", [False, True])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_forward_kl_matches_loop_reference(mode, top_k):
    case = make_case(seed=3)
    loss, metrics, grad = run_code_forward_kl(case, mode, top_k)
    student_logits, teacher_logits, tokens, topk_ids, mask = case
    x_ref = student_logits.clone().requires_grad_(True)
    ref_loss, ref_metrics = ref_forward_kl(x_ref, teacher_logits, tokens, topk_ids, mask, mode, top_k)
    ref_loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12, abs=1e-12)
    torch.testing.assert_close(grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    assert set(metrics) == {"nll", "distill_loss"} | ({"fkl_ce", "fkl_kl"} if top_k else set())
    for key, value in ref_metrics.items():
        assert metrics[key].item() == pytest.approx(value.item(), rel=1e-12, abs=1e-12), key
    assert metrics["distill_loss"].item() == loss.item()


def test_topk_with_full_vocab_is_exact_forward_kl():
    """K = V: the loss is CE(p_T, p_S) exactly, fkl_kl is KL(p_T || p_S), and the gradient is the KL's."""
    vocab = 11
    student_logits, teacher_logits, tokens, _, mask = make_case(seed=5, vocab=vocab)
    topk_ids = torch.argsort(teacher_logits, dim=-1, descending=True)  # all V ids, like a top-V list
    x = student_logits.clone().requires_grad_(True)
    lp, s_topk, _, t_topk = code_inputs(x, teacher_logits, tokens, topk_ids)
    norm = loss_normalizer(mask, "token-mean")
    loss, metrics = forward_kl_loss(lp, mask, normalizer=norm, student_topk_logprobs=s_topk,
                                    teacher_topk_logprobs=t_topk)
    loss.backward()

    x_ref = student_logits.clone().requires_grad_(True)
    logp_s, logp_t = torch.log_softmax(x_ref, -1), torch.log_softmax(teacher_logits, -1)
    exact_kl = (logp_t.exp() * (logp_t - logp_s)).sum(-1)  # (B, T) over the full vocabulary
    entropy_t = -(logp_t.exp() * logp_t).sum(-1)
    mean_kl = (exact_kl * mask).sum() / norm
    mean_kl.backward()
    assert metrics["fkl_kl"].item() == pytest.approx(mean_kl.item(), rel=1e-10)
    assert loss.item() == pytest.approx(mean_kl.item() + ((entropy_t * mask).sum() / norm).item(), rel=1e-10)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)


def test_topk_target_is_renormalised_and_minus_inf_candidates_drop_out():
    """A -inf teacher entry inside the loss mask is "no candidate": same as the list without it."""
    student_logits, teacher_logits, tokens, topk_ids, mask = make_case(seed=8, num_k=4)
    lp, s_topk, _, t_topk = code_inputs(student_logits, teacher_logits, tokens, topk_ids)
    norm = loss_normalizer(mask, "token-mean")
    short, short_m = forward_kl_loss(lp, mask, normalizer=norm, student_topk_logprobs=s_topk[..., :3],
                                     teacher_topk_logprobs=t_topk[..., :3])
    padded_t = t_topk.clone()
    padded_t[..., 3] = float("-inf")
    padded_s = s_topk.clone()
    padded_s[..., 3] = float("-inf")  # even a -inf student value must not make 0 * inf
    s = padded_s.clone().requires_grad_(True)
    loss, metrics = forward_kl_loss(lp, mask, normalizer=norm, student_topk_logprobs=s, teacher_topk_logprobs=padded_t)
    loss.backward()
    assert loss.item() == pytest.approx(short.item(), rel=1e-12)
    assert metrics["fkl_kl"].item() == pytest.approx(short_m["fkl_kl"].item(), rel=1e-12)
    assert torch.isfinite(s.grad).all() and torch.all(s.grad[..., 3] == 0)
    # The target sums to one over the K ids: d loss / d log p_S(k) = -q_k / N per live token.
    assert s.grad.sum().item() == pytest.approx(-1.0, rel=1e-12)


# ----------------------------------------------------------------------------- on-policy distillation


def ref_reverse_kl(student_logits, teacher_logits, tokens, mask, mode, coef):
    """(value, gradient surrogate, metrics): value coef * k1, gradient of coef * sg(k1) * log p_S."""
    value, surrogate, k3 = {}, {}, {}
    for b, t in live_tokens(mask):
        s = ref_logp(student_logits[b, t], tokens[b, t].item())
        t_lp = ref_logp(teacher_logits[b, t], tokens[b, t].item()).detach()
        k1 = s.detach() - t_lp
        value[b, t] = coef * k1
        surrogate[b, t] = coef * k1 * s
        k3[b, t] = torch.exp(-k1) - 1.0 + k1
    loss, _ = ref_aggregate(value, mask, mode)
    grad_fn, _ = ref_aggregate(surrogate, mask, mode)
    metrics = {"reverse_kl": ref_aggregate({k: v / coef for k, v in value.items()}, mask, mode)[1],
               "reverse_kl_k3": ref_aggregate(k3, mask, mode)[1]}
    return loss, grad_fn, metrics


@pytest.mark.parametrize("coef", [1.0, 0.5])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_reverse_kl_matches_loop_reference(mode, coef):
    student_logits, teacher_logits, tokens, topk_ids, mask = make_case(seed=4)
    x = student_logits.clone().requires_grad_(True)
    lp, _, t_lp, _ = code_inputs(x, teacher_logits, tokens, topk_ids)
    loss, metrics = reverse_kl_loss(lp, t_lp, mask, normalizer=loss_normalizer(mask, mode), loss_agg_mode=mode,
                                    coef=coef)
    loss.backward()
    x_ref = student_logits.clone().requires_grad_(True)
    ref_loss, ref_grad_fn, ref_metrics = ref_reverse_kl(x_ref, teacher_logits, tokens, mask, mode, coef)
    ref_grad_fn.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12, abs=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    assert set(metrics) == {"reverse_kl", "reverse_kl_k3", "distill_loss"}
    for key, value in ref_metrics.items():
        assert metrics[key].item() == pytest.approx(value.item(), rel=1e-12, abs=1e-12), key
    assert metrics["reverse_kl_k3"].item() >= 0


@pytest.mark.parametrize("clip", [None, 0.3])
def test_opd_token_advantages_loop_reference(clip):
    student_logits, teacher_logits, tokens, topk_ids, mask = make_case(seed=6)
    old, _, teacher, _ = code_inputs(student_logits, teacher_logits, tokens, topk_ids)
    teacher = torch.where(mask > 0, teacher, torch.full_like(teacher, float("-inf")))  # filler
    old = old.clone().requires_grad_(True)
    adv = opd_token_advantages(old, teacher, mask, coef=0.7, clip=clip)
    assert adv.shape == mask.shape and not adv.requires_grad and torch.isfinite(adv).all()
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            expected = 0.0
            if mask[b, t] > 0:
                expected = 0.7 * (teacher[b, t].item() - old[b, t].item())
                if clip is not None:
                    expected = min(max(expected, -clip), clip)
            assert adv[b, t].item() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    if clip is not None:
        assert adv.abs().max().item() == pytest.approx(clip)  # the cap is reached in this case


@pytest.mark.parametrize("mode", AGG_MODES)
def test_advantage_mode_equals_loss_mode_on_first_on_policy_minibatch(mode):
    """PPO-clip with A = opd_token_advantages at ratio 1 has the gradient of reverse_kl_loss.

    Off-policy (a later mini-batch, ratio != 1 but inside the clip range) they differ: the
    equality is a property of the on-policy point, not of the code paths being the same.
    """
    student_logits, teacher_logits, tokens, topk_ids, mask = make_case(seed=9)
    coef = 0.8
    norm = loss_normalizer(mask, mode)
    config = PolicyLossConfig(loss_agg_mode=mode, clip_low=0.2, clip_high=0.28)

    def grads(shift: float):
        old, _, teacher, _ = code_inputs(student_logits, teacher_logits, tokens, topk_ids)
        adv = opd_token_advantages(old, teacher, mask, coef=coef)
        x_adv = (student_logits + shift * torch.cos(student_logits)).requires_grad_(True)
        lp_adv = code_inputs(x_adv, teacher_logits, tokens, topk_ids)[0]
        pg_loss, pg_metrics = policy_loss(lp_adv, old, adv, mask, config=config, normalizer=norm)
        pg_loss.backward()
        x_loss = (student_logits + shift * torch.cos(student_logits)).requires_grad_(True)
        lp_loss = code_inputs(x_loss, teacher_logits, tokens, topk_ids)[0]
        reverse_kl_loss(lp_loss, teacher, mask, normalizer=norm, loss_agg_mode=mode, coef=coef)[0].backward()
        return x_adv.grad, x_loss.grad, pg_metrics

    adv_grad, loss_grad, pg_metrics = grads(shift=0.0)
    assert pg_metrics["clip_frac"].item() == 0.0
    assert pg_metrics["ratio_max"].item() == pytest.approx(1.0, abs=1e-12)
    assert adv_grad.abs().max() > 1e-3  # a real gradient, not 0 == 0
    torch.testing.assert_close(adv_grad, loss_grad, rtol=1e-10, atol=1e-13)

    adv_grad, loss_grad, pg_metrics = grads(shift=0.05)
    assert pg_metrics["clip_frac"].item() == 0.0 and pg_metrics["ratio_max"].item() != pytest.approx(1.0)
    assert (adv_grad - loss_grad).abs().max() > 1e-4


# ----------------------------------------------------------------------------- contracts


@pytest.mark.parametrize("mode", AGG_MODES)
def test_micro_batch_invariance(mode):
    student_logits, teacher_logits, tokens, topk_ids, mask = make_case(seed=11, num_seqs=8)
    norm = loss_normalizer(mask, mode)

    def nll(lp, s_topk, t_lp, t_topk, m):
        return forward_kl_loss(lp, m, normalizer=norm, loss_agg_mode=mode)

    def top_k(lp, s_topk, t_lp, t_topk, m):
        return forward_kl_loss(lp, m, normalizer=norm, loss_agg_mode=mode, student_topk_logprobs=s_topk,
                               teacher_topk_logprobs=t_topk)

    def reverse(lp, s_topk, t_lp, t_topk, m):
        return reverse_kl_loss(lp, t_lp, m, normalizer=norm, loss_agg_mode=mode, coef=0.5)

    for loss_fn in (nll, top_k, reverse):
        results = {}
        for num_micro in (1, 2, 4):
            x = student_logits.clone().requires_grad_(True)
            total: dict[str, torch.Tensor] = {}
            for rows in torch.arange(8).chunk(num_micro):
                inputs = code_inputs(x[rows], teacher_logits[rows], tokens[rows], topk_ids[rows])
                loss, metrics = loss_fn(*inputs, mask[rows])
                loss.backward()
                for key, value in {"loss": loss.detach(), **metrics}.items():
                    total[key] = total.get(key, 0.0) + value
            results[num_micro] = (total, x.grad.clone())
        full_total, full_grad = results[1]
        for num_micro in (2, 4):
            total, grad = results[num_micro]
            torch.testing.assert_close(grad, full_grad, rtol=0, atol=1e-12)
            for key in full_total:
                torch.testing.assert_close(total[key], full_total[key], rtol=0, atol=1e-12)


def test_fillers_outside_the_mask_stay_finite():
    """-inf / -1e9 fillers in every input outside the mask: same loss, finite gradients and metrics."""
    student_logits, teacher_logits, tokens, topk_ids, mask = make_case(seed=12)
    lp, s_topk, t_lp, t_topk = code_inputs(student_logits, teacher_logits, tokens, topk_ids)
    norm = loss_normalizer(mask, "token-mean")
    dead = mask == 0
    for filler in (float("-inf"), -1e9):
        g_lp = lp.masked_fill(dead, filler).requires_grad_(True)
        g_s = s_topk.masked_fill(dead[..., None], filler).requires_grad_(True)
        g_t, g_tk = t_lp.masked_fill(dead, filler), t_topk.masked_fill(dead[..., None], filler)
        for (loss, metrics), clean in (
            (forward_kl_loss(g_lp, mask, normalizer=norm, student_topk_logprobs=g_s, teacher_topk_logprobs=g_tk),
             forward_kl_loss(lp, mask, normalizer=norm, student_topk_logprobs=s_topk, teacher_topk_logprobs=t_topk)),
            (reverse_kl_loss(g_lp, g_t, mask, normalizer=norm), reverse_kl_loss(lp, t_lp, mask, normalizer=norm)),
        ):
            loss.backward()
            assert loss.item() == pytest.approx(clean[0].item(), rel=1e-12)
            assert all(torch.isfinite(v) for v in metrics.values())
        assert torch.isfinite(g_lp.grad).all() and torch.isfinite(g_s.grad).all()
        assert torch.all(g_lp.grad[dead] == 0) and torch.all(g_s.grad[dead] == 0)


def test_opd_modes_match_config_names():
    from megatron_s2lpo.config.algo import OPD_MODES as CONFIG_OPD_MODES

    assert tuple(CONFIG_OPD_MODES) == OPD_MODES == ("advantage", "loss")


def test_clear_errors():
    student_logits, teacher_logits, tokens, topk_ids, mask = make_case(seed=0)
    lp, s_topk, t_lp, t_topk = code_inputs(student_logits, teacher_logits, tokens, topk_ids)
    with pytest.raises(ValueError, match="normalizer"):
        forward_kl_loss(lp, mask, normalizer=0.0)
    with pytest.raises(ValueError, match="normalizer"):
        reverse_kl_loss(lp, t_lp, mask, normalizer=-1.0)
    with pytest.raises(ValueError, match="loss_mask has shape"):
        forward_kl_loss(lp, mask[:, :3], normalizer=1.0)
    with pytest.raises(ValueError, match="come together"):
        forward_kl_loss(lp, mask, normalizer=1.0, student_topk_logprobs=s_topk)
    with pytest.raises(ValueError, match="student_topk_logprobs has shape"):
        forward_kl_loss(lp, mask, normalizer=1.0, student_topk_logprobs=s_topk[:, :3], teacher_topk_logprobs=t_topk)
    with pytest.raises(ValueError, match="teacher_topk_logprobs has shape"):
        forward_kl_loss(lp, mask, normalizer=1.0, student_topk_logprobs=s_topk, teacher_topk_logprobs=t_topk[..., :2])
    with pytest.raises(ValueError, match="loss_agg_mode"):
        forward_kl_loss(lp, mask, normalizer=1.0, loss_agg_mode="sum")
    with pytest.raises(ValueError, match="teacher_logprobs has shape"):
        reverse_kl_loss(lp, t_lp[:, :2], mask, normalizer=1.0)
    with pytest.raises(ValueError, match="coef"):
        reverse_kl_loss(lp, t_lp, mask, normalizer=1.0, coef=-0.1)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        reverse_kl_loss(lp[0], t_lp[0], mask[0], normalizer=1.0)
    with pytest.raises(ValueError, match="opd_coef"):
        opd_token_advantages(lp, t_lp, mask, coef=-1.0)
    with pytest.raises(ValueError, match="opd_coef"):
        opd_token_advantages(lp, t_lp, mask, coef=math.inf)
    with pytest.raises(ValueError, match="opd_clip"):
        opd_token_advantages(lp, t_lp, mask, clip=0.0)
    with pytest.raises(ValueError, match="teacher_logprobs has shape"):
        opd_token_advantages(lp, t_lp[:, :2], mask)
    with pytest.raises(ValueError, match="old_logprobs"):
        opd_token_advantages(lp[0], t_lp[0], mask[0])
