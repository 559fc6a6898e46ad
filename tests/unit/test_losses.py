"""Policy loss against a float64 Python loop reference; micro-batch invariance; config checks."""

import math

import pytest
import torch

from megatron_s2lpo.algo.losses import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    PolicyLossConfig,
    kl_penalty,
    loss_normalizer,
    policy_loss,
    truncated_importance_weights,
)

AGG_MODES = sorted(AGGREGATIONS)


# ----------------------------------------------------------------------------- reference


def ref_kl(lp: float, ref: float, estimator: str) -> tuple[float, float]:
    """(value, d value / d lp) of one token's KL estimate."""
    if estimator == "k1":
        return lp - ref, 1.0
    if estimator == "k2":
        return 0.5 * (lp - ref) ** 2, lp - ref
    kl = ref - lp  # low_var_kl; inputs in the tests stay inside both clamps
    return math.exp(kl) - kl - 1.0, 1.0 - math.exp(kl)


def ref_token(lp, old, adv, cfg, weight) -> tuple[float, float, bool, bool]:
    """One token's PPO-clip loss, its derivative w.r.t. lp, clip flag, dual-clip flag."""
    ratio = math.exp(lp - old)
    unclipped = -adv * ratio
    clipped = -adv * min(max(ratio, 1 - cfg.clip_low), 1 + cfg.clip_high)
    loss, grad = (unclipped, -adv * ratio) if unclipped >= clipped else (clipped, 0.0)
    dual = False
    if cfg.clip_ratio_c is not None and adv < 0 and loss > -adv * cfg.clip_ratio_c:
        loss, grad, dual = -adv * cfg.clip_ratio_c, 0.0, True
    return loss * weight, grad * weight, clipped > unclipped, dual


def ref_policy_loss(lp, old, adv, mask, cfg, ref=None, ent=None, weights=None):
    """Loop over sequences and tokens in Python floats; returns (loss, grad, clip_frac)."""
    rows = []  # per sequence: list of (loss, grad, clip, token index)
    for b in range(len(lp)):
        row = []
        for t in range(len(lp[b])):
            if not mask[b][t]:
                continue
            w = 1.0 if weights is None else weights[b][t]
            loss, grad, clip, _ = ref_token(lp[b][t], old[b][t], adv[b][t], cfg, w)
            if ref is not None and cfg.kl_coef > 0:
                kl, dkl = ref_kl(lp[b][t], ref[b][t], cfg.kl_estimator)
                loss, grad = loss + cfg.kl_coef * kl, grad + cfg.kl_coef * dkl
            if ent is not None:
                loss -= cfg.entropy_coef * ent[b][t]
            row.append((loss, grad, float(clip), t))
        rows.append(row)
    live = [row for row in rows if row]
    num_tokens = sum(len(row) for row in live)
    grads = [[0.0] * len(lp[0]) for _ in lp]
    total, clip_total = 0.0, 0.0
    for b, row in enumerate(rows):
        if not row:
            continue
        if cfg.loss_agg_mode == "token-mean":
            scale, clip_scale = 1.0 / num_tokens, 1.0 / num_tokens
        elif cfg.loss_agg_mode == "seq-mean-token-sum":
            scale, clip_scale = 1.0 / len(live), 1.0 / (len(live) * len(row))
        else:  # seq-mean-token-mean
            scale = clip_scale = 1.0 / (len(live) * len(row))
        for loss, grad, clip, t in row:
            total += loss * scale
            clip_total += clip * clip_scale
            grads[b][t] = grad * scale
    return total, grads, clip_total


def random_batch(seed: int, num_seqs: int = 8, seq_len: int = 12, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(num_seqs, seq_len, generator=gen, dtype=dtype) * 3  # log-probs in (-3, 0)
    logprobs = old + 0.4 * torch.randn(num_seqs, seq_len, generator=gen, dtype=dtype)  # ratios ~ 0.4..2.5
    adv = torch.randn(num_seqs, 1, generator=gen, dtype=dtype).expand(num_seqs, seq_len).clone()
    prompt_len = torch.randint(1, 5, (num_seqs, 1), generator=gen)
    resp_len = torch.randint(0, seq_len - 4, (num_seqs, 1), generator=gen)
    pos = torch.arange(seq_len)
    mask = ((pos >= prompt_len) & (pos < prompt_len + resp_len)).to(dtype)  # (B, T)
    mask[0, 2:] = 1.0  # at least one row with tokens
    mask[1] = 0.0  # and one without
    ref = old + 0.3 * torch.randn(num_seqs, seq_len, generator=gen, dtype=dtype)
    ent = torch.rand(num_seqs, seq_len, generator=gen, dtype=dtype) * 2
    weights = torch.rand(num_seqs, seq_len, generator=gen, dtype=dtype) * 1.5 + 0.2
    return logprobs, old, adv, mask, ref, ent, weights


def configs():
    yield from (
        PolicyLossConfig(loss_agg_mode=agg, clip_low=0.2, clip_high=0.28, clip_ratio_c=c)
        for agg in AGG_MODES
        for c in (None, 1.5)
    )
    for est in sorted(KL_ESTIMATORS):
        yield PolicyLossConfig(loss_agg_mode="seq-mean-token-mean", kl_coef=0.1, kl_estimator=est, entropy_coef=0.01)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("with_weights", [False, True])
def test_loss_and_gradient_match_loop_reference(with_weights):
    for seed, cfg in enumerate(configs()):
        logprobs, old, adv, mask, ref, ent, weights = random_batch(seed)
        weights = weights if with_weights else None
        logprobs.requires_grad_(True)
        norm = loss_normalizer(mask, cfg.loss_agg_mode)
        loss, metrics = policy_loss(
            logprobs, old, adv, mask, config=cfg, normalizer=norm, ref_logprobs=ref, entropy=ent, is_weights=weights
        )
        loss.backward()
        lists = [x.tolist() if x is not None else None for x in (logprobs.detach(), old, adv, mask, ref, ent, weights)]
        exp_loss, exp_grad, exp_clip = ref_policy_loss(*lists[:4], cfg, ref=lists[4], ent=lists[5], weights=lists[6])
        assert loss.item() == pytest.approx(exp_loss, rel=1e-10, abs=1e-12), cfg
        torch.testing.assert_close(logprobs.grad, torch.tensor(exp_grad, dtype=torch.float64), rtol=1e-10, atol=1e-12)
        assert metrics["clip_frac"].item() == pytest.approx(exp_clip, rel=1e-10, abs=1e-12)
        recon = metrics["pg_loss"] + cfg.kl_coef * metrics["kl_loss"] - cfg.entropy_coef * metrics["entropy_loss"]
        assert recon.item() == pytest.approx(loss.item(), rel=1e-12, abs=1e-12)


def test_gradcheck_finite_differences():
    logprobs, old, adv, mask, ref, ent, weights = random_batch(3, num_seqs=4, seq_len=6)
    cfg = PolicyLossConfig(kl_coef=0.1, clip_high=0.28, loss_agg_mode="seq-mean-token-mean")
    norm = loss_normalizer(mask, cfg.loss_agg_mode)

    def fn(lp):
        return policy_loss(lp, old, adv, mask, config=cfg, normalizer=norm, ref_logprobs=ref, is_weights=weights)[0]

    assert torch.autograd.gradcheck(fn, (logprobs.clone().requires_grad_(True),), eps=1e-7, atol=1e-6)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_micro_batch_invariance(agg):
    logprobs, old, adv, mask, ref, ent, weights = random_batch(11, num_seqs=8)
    cfg = PolicyLossConfig(loss_agg_mode=agg, clip_high=0.28, kl_coef=0.05, entropy_coef=0.01)
    norm = loss_normalizer(mask, agg)
    results = {}
    for num_micro in (1, 2, 4):
        lp = logprobs.clone().requires_grad_(True)
        total, summed = torch.zeros((), dtype=torch.float64), {}
        for rows in torch.arange(8).chunk(num_micro):
            loss, metrics = policy_loss(
                lp[rows], old[rows], adv[rows], mask[rows], config=cfg, normalizer=norm,
                ref_logprobs=ref[rows], entropy=ent[rows], is_weights=weights[rows],
            )  # fmt: skip
            loss.backward()
            total = total + loss.detach()
            for key, value in metrics.items():
                combine = torch.maximum if key == "ratio_max" else torch.add
                summed[key] = combine(summed[key], value) if key in summed else value
        results[num_micro] = (total, lp.grad.clone(), summed)
    full_loss, full_grad, full_metrics = results[1]
    for num_micro in (2, 4):
        loss, grad, metrics = results[num_micro]
        torch.testing.assert_close(loss, full_loss, rtol=0, atol=1e-6)
        torch.testing.assert_close(grad, full_grad, rtol=0, atol=1e-6)
        for key in full_metrics:
            torch.testing.assert_close(metrics[key], full_metrics[key], rtol=0, atol=1e-6)


def test_normalizer_counts():
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    assert loss_normalizer(mask, "token-mean") == 6.0
    assert loss_normalizer(mask, "seq-mean-token-sum") == 2.0
    assert loss_normalizer(mask.bool(), "seq-mean-token-mean") == 2.0
    with pytest.raises(ValueError, match="loss_agg_mode"):
        loss_normalizer(mask, "sum")


def test_clip_higher_and_dual_clip_values():
    def one_token(log_ratio, adv, cfg):
        lp = torch.tensor([[log_ratio]], dtype=torch.float64)
        return policy_loss(lp, torch.zeros(1, 1, dtype=torch.float64), torch.tensor([[adv]], dtype=torch.float64),
                           torch.ones(1, 1), config=cfg, normalizer=1.0)  # fmt: skip

    ratio = 1.25
    loss, metrics = one_token(math.log(ratio), 1.0, PolicyLossConfig(clip_high=0.2))
    assert loss.item() == pytest.approx(-1.2) and metrics["clip_frac"].item() == 1.0
    loss, metrics = one_token(math.log(ratio), 1.0, PolicyLossConfig(clip_high=0.28))
    assert loss.item() == pytest.approx(-1.25) and metrics["clip_frac"].item() == 0.0
    # A < 0 and a large ratio: the dual clip caps the loss at -A * c.
    loss, metrics = one_token(2.0, -1.0, PolicyLossConfig(clip_ratio_c=3.0))
    assert loss.item() == pytest.approx(3.0) and metrics["dual_clip_frac"].item() == 1.0
    loss, metrics = one_token(2.0, -1.0, PolicyLossConfig(clip_ratio_c=None))
    assert loss.item() == pytest.approx(math.exp(2.0)) and metrics["dual_clip_frac"].item() == 0.0
    assert metrics["ratio_max"].item() == pytest.approx(math.exp(2.0))


def test_kl_estimators_per_token():
    lp = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64)
    ref = torch.tensor([[-1.5, -1.0, -0.5]], dtype=torch.float64)
    for est in KL_ESTIMATORS:
        expected = [ref_kl(a, b, est)[0] for a, b in zip(lp[0].tolist(), ref[0].tolist())]
        torch.testing.assert_close(kl_penalty(lp, ref, est)[0], torch.tensor(expected, dtype=torch.float64))
    # low_var_kl is clamped to [-10, 10] like verl (exp(30) - 31 would be 1e13).
    assert kl_penalty(torch.tensor([[-40.0]]), torch.tensor([[-10.0]]), "low_var_kl").item() == 10.0
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_penalty(lp, ref, "k9")


def test_truncated_importance_weights():
    old = torch.tensor([[-1.0, -0.1, 0.0, -50.0, 0.0]])
    behaviour = torch.tensor([[-1.5, -0.2, -60.0, 0.0, 0.0]])
    weights = truncated_importance_weights(old, behaviour, threshold=2.0)
    expected = [min(math.exp(o - b), 2.0) for o, b in zip(old[0].tolist(), behaviour[0].tolist())]
    torch.testing.assert_close(weights[0], torch.tensor(expected), rtol=1e-6, atol=1e-30)
    assert torch.isfinite(weights).all() and not weights.requires_grad
    with pytest.raises(ValueError, match="threshold"):
        truncated_importance_weights(old, behaviour, threshold=0.0)
    with pytest.raises(ValueError, match="same shape"):
        truncated_importance_weights(old, behaviour[:, :3], threshold=2.0)


def test_padding_garbage_does_not_leak():
    logprobs, old, adv, mask, *_ = random_batch(5)
    garbage = logprobs.clone()
    garbage[mask == 0] = float("-inf")  # e.g. uninitialised padding
    lp = garbage.clone().requires_grad_(True)
    cfg = PolicyLossConfig()
    norm = loss_normalizer(mask, cfg.loss_agg_mode)
    loss, metrics = policy_loss(lp, old, adv, mask, config=cfg, normalizer=norm)
    loss.backward()
    clean, _ = policy_loss(logprobs, old, adv, mask, config=cfg, normalizer=norm)
    assert loss.item() == pytest.approx(clean.item(), rel=1e-12)
    assert torch.isfinite(lp.grad).all() and all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"clip_low": 1.0}, "algo.clip_low"),
        ({"clip_low": -0.1}, "algo.clip_low"),
        ({"clip_high": -0.1}, "algo.clip_high"),
        ({"clip_ratio_c": 1.0}, "algo.clip_ratio_c"),
        ({"loss_agg_mode": "mean"}, "algo.loss_agg_mode"),
        ({"kl_estimator": "k4"}, "algo.kl_estimator"),
        ({"kl_coef": -1.0}, "algo.kl_coef"),
        ({"entropy_coef": float("nan")}, "algo.entropy_coef"),
    ],
)
def test_config_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PolicyLossConfig(**kwargs)


def test_input_validation():
    logprobs, old, adv, mask, ref, *_ = random_batch(0)
    cfg = PolicyLossConfig()
    with pytest.raises(ValueError, match="advantages has shape"):
        policy_loss(logprobs, old, adv[:, :3], mask, config=cfg, normalizer=1.0)
    with pytest.raises(ValueError, match="normalizer"):
        policy_loss(logprobs, old, adv, mask, config=cfg, normalizer=0.0)
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(logprobs, old, adv, mask, config=PolicyLossConfig(kl_coef=0.1), normalizer=1.0)
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(logprobs, old, adv, mask, config=PolicyLossConfig(entropy_coef=0.1), normalizer=1.0)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        policy_loss(logprobs[0], old[0], adv[0], mask[0], config=cfg, normalizer=1.0)
    with pytest.raises(Exception):
        cfg.clip_low = 0.3  # frozen
