"""TP=2 log-probs at given ids (distillation top-k targets) against TP=1, in one 2-process launch.

    pytest tests/distributed/test_topk_logprobs.py

Each rank holds half of the padded vocabulary columns of the same logits and computes through
megatron's TP group; every rank also computes the TP=1 result on the full logits locally
(tp_group=None). Checks: values and gradients of `vocab_parallel_logprobs_at` equal TP=1 and a
float64 full-vocabulary log_softmax (ids on both ranks, repeated ids, temperature); a rank whose
columns are all padding; the top-k forward-KL loss through `token_topk_logprobs` has the TP=1
loss and gradient (the identity backward of the reductions does not scale by the TP size).

Then the learner's distillation objectives through megatron's schedule: a TP=2 learner takes
one `forward_kl` (teacher top-k) and one `reverse_kl` step; a TP=1 x DP=2 learner loaded from
the same initial checkpoint must report the same loss and gradient norm for each.
"""

from __future__ import annotations

import os
import shutil
import sys

import torch
import torch.distributed as dist

from common import fixed_batch, max_abs_diff, run_check, shared_tmpdir, tiny_arch
from tp2_checks import learner_config

from megatron_s2lpo.algo.losses import PolicyLossConfig

from megatron_s2lpo.algo.distill import forward_kl_loss
from megatron_s2lpo.algo.losses import loss_normalizer
from megatron_s2lpo.learner.logprobs import token_logprobs, token_topk_logprobs, vocab_parallel_logprobs_at
from megatron_s2lpo.learner.parallel import destroy_parallel, init_parallel

PADDED = 512


def rank_slice(tensor: torch.Tensor, groups) -> torch.Tensor:
    width = tensor.shape[-1] // groups.tp_size
    return tensor[..., groups.tp_rank * width:(groups.tp_rank + 1) * width]


def check_logprobs_at(groups, vocab: int) -> dict:
    """TP=2 slice vs TP=1 full logits vs float64 log_softmax: values and d(sum g * logp)/dlogits."""
    torch.manual_seed(vocab)  # same data on both ranks
    temperature, num_k = 0.8, 6
    logits = torch.randn(3, 9, PADDED, dtype=torch.float64) * 4
    logits[..., vocab:] = 30.0  # padded columns: must not matter
    ids = torch.randint(0, vocab, (3, 9, num_k))
    ids[..., 0] = 3  # owned by rank 0
    ids[..., 1] = vocab - 1  # owned by the last rank holding real columns
    ids[..., 2] = ids[..., 1]  # a repeated id
    upstream = torch.randn(3, 9, num_k, dtype=torch.float64)

    piece = rank_slice(logits, groups).clone().requires_grad_(True)
    lp_tp2 = vocab_parallel_logprobs_at(piece, ids, vocab_size=vocab, tp_group=groups.tp_group,
                                        temperature=temperature)
    (lp_tp2 * upstream).sum().backward()
    full = logits.clone().requires_grad_(True)
    lp_tp1 = vocab_parallel_logprobs_at(full, ids, vocab_size=vocab, temperature=temperature)
    (lp_tp1 * upstream).sum().backward()
    ref = torch.log_softmax(logits[..., :vocab] / temperature, dim=-1).gather(-1, ids)

    diffs = {"value_vs_tp1": max_abs_diff(lp_tp2, lp_tp1), "value_vs_reference": max_abs_diff(lp_tp2, ref),
             "grad_vs_tp1": max_abs_diff(piece.grad, rank_slice(full.grad, groups))}
    padding_grad = float(full.grad[..., vocab:].abs().max())
    real_columns = max(0, min(PADDED // groups.tp_size, vocab - groups.tp_rank * PADDED // groups.tp_size))
    return {"ok": max(diffs.values()) < 1e-12 and padding_grad == 0.0,
            "real_columns_on_this_rank": real_columns, "padding_grad": padding_grad, **diffs}


def check_forward_kl_gradient(groups) -> dict:
    """The top-k forward-KL loss (replicated on both TP ranks) and its gradient equal TP=1."""
    torch.manual_seed(5)
    vocab, num_k = 300, 8
    logits = torch.randn(4, 10, PADDED) * 3
    teacher = torch.log_softmax(torch.randn(4, 10, vocab) * 3, dim=-1)
    topk_lp, topk_ids = teacher.topk(num_k, dim=-1)  # (B, T, K): the teacher's top-k at every position
    tokens = topk_ids[..., 0]  # teacher-generated: its argmax
    mask = torch.zeros(4, 10)
    mask[:, 3:] = 1.0
    mask[2, 7:] = 0.0
    norm = loss_normalizer(mask, "token-mean")

    def loss_and_grad(x: torch.Tensor, tp_group) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.clone().requires_grad_(True)
        lp, _ = token_logprobs(x, tokens, vocab_size=vocab, tp_group=tp_group)
        student_topk = token_topk_logprobs(x, topk_ids, vocab_size=vocab, tp_group=tp_group)
        loss, _ = forward_kl_loss(lp, mask, normalizer=norm, student_topk_logprobs=student_topk,
                                  teacher_topk_logprobs=topk_lp)
        loss.backward()
        return loss.detach(), x.grad

    loss_tp2, grad_tp2 = loss_and_grad(rank_slice(logits, groups), groups.tp_group)
    loss_tp1, grad_tp1 = loss_and_grad(logits, None)
    diffs = {"loss": abs(float(loss_tp2 - loss_tp1)), "grad": max_abs_diff(grad_tp2, rank_slice(grad_tp1, groups))}
    return {"ok": max(diffs.values()) < 1e-5 and float(grad_tp1.abs().max()) > 1e-4,
            "loss_value": float(loss_tp2), **diffs}


OBJECTIVES = ("forward_kl", "reverse_kl")


def check_truncated_logprobs(groups) -> dict:
    """Log-probs under the engine's top-k / top-p (chunked_logprobs(truncation=...)): TP=2 equals
    TP=1 in values, kept mass and gradient (the kept set needs the whole row: all-gathered)."""
    from megatron_s2lpo.learner.logprobs import chunked_logprobs

    torch.manual_seed(11)
    vocab, n = 300, 20
    logits = torch.randn(n, PADDED, dtype=torch.float64) * 3
    logits[:, vocab:] = 40.0
    targets = torch.randint(0, vocab, (n,))
    upstream = torch.randn(n, dtype=torch.float64)
    out = {}
    for name, truncation in (("top_p", (-1, 0.8)), ("top_k_top_p", (20, 0.9))):
        results = []
        for piece, group in ((rank_slice(logits, groups).clone(), groups.tp_group), (logits.clone(), None)):
            piece.requires_grad_(True)
            masses: list = []
            lp, ent, _ = chunked_logprobs(piece, torch.arange(n), targets, lambda h: h, vocab_size=vocab,
                                          tp_group=group, temperature=0.9, with_entropy=True, chunk_tokens=7,
                                          truncation=truncation, kept_mass=masses)
            ((lp * upstream).sum() + ent.sum()).backward()
            results.append((lp, ent, torch.cat(masses), piece.grad))
        (lp2, ent2, m2, g2), (lp1, ent1, m1, g1) = results
        out[name] = max(max_abs_diff(lp2, lp1), max_abs_diff(ent2, ent1), max_abs_diff(m2, m1),
                        max_abs_diff(g2, rank_slice(g1, groups)))
        out[name + "_kept_mass_mean"] = float(m1.exp().mean())
    return {"ok": max(out["top_p"], out["top_k_top_p"]) < 1e-6 and out["top_p_kept_mass_mean"] < 0.99, **out}


def distill_batch():
    """fixed_batch plus teacher scores: log-probs of the tokens and a top-4 per position."""
    batch = fixed_batch(seed=3)
    gen = torch.Generator().manual_seed(4)
    vocab = tiny_arch().vocab_size
    teacher = torch.log_softmax(torch.randn(*batch.tokens.shape, vocab, generator=gen) * 2, dim=-1)
    batch.teacher_logprobs = teacher.gather(-1, batch.tokens.unsqueeze(-1)).squeeze(-1) * batch.loss_mask
    batch.teacher_topk_logprobs, batch.teacher_topk_ids = teacher.topk(4, dim=-1)
    return batch


def main() -> None:
    from megatron_s2lpo.learner import Learner

    groups = init_parallel(tensor_parallel_size=2, seed=3)
    run_check("topk_tp2_equals_tp1", lambda: check_logprobs_at(groups, vocab=300))
    run_check("topk_tp2_rank_with_only_padding", lambda: check_logprobs_at(groups, vocab=200))
    run_check("topk_tp2_forward_kl_gradient_equals_tp1", lambda: check_forward_kl_gradient(groups))
    run_check("truncated_logprobs_tp2_equal_tp1", lambda: check_truncated_logprobs(groups))
    root = shared_tmpdir("topk_checks_")
    learner = Learner(tiny_arch(), learner_config(2), groups=groups)
    learner.save(root)
    tp2 = {}
    for objective in OBJECTIVES:  # each objective from the saved initial weights
        learner.load(root)
        metrics = learner.train_step(distill_batch(), loss_config=PolicyLossConfig(), objective=objective,
                                     distill_coef=0.5)
        tp2[objective] = metrics
    destroy_parallel(destroy_process_group=False)

    groups = init_parallel(tensor_parallel_size=1, seed=3)  # DP=2
    learner = Learner(tiny_arch(), learner_config(1), groups=groups)
    for objective in OBJECTIVES:
        learner.load(root)
        metrics = learner.train_step(distill_batch(), loss_config=PolicyLossConfig(), objective=objective,
                                     distill_coef=0.5)

        def same(objective=objective, metrics=metrics) -> dict:
            ref = tp2[objective]
            diffs = {"loss": abs(metrics["loss"] - ref["loss"]), "grad_norm": abs(metrics["grad_norm"] - ref["grad_norm"])}
            return {"ok": diffs["loss"] < 1e-6 and diffs["grad_norm"] < 1e-5 and metrics["grad_norm"] > 1e-3,
                    "loss_value": metrics["loss"], "grad_norm_value": metrics["grad_norm"], **diffs}

        run_check(f"learner_{objective}_tp2_equals_tp1_dp2", same)
    dist.barrier()
    if int(os.environ["RANK"]) == 0:
        shutil.rmtree(root, ignore_errors=True)
    destroy_parallel()


if __name__ == "__main__":
    sys.exit(main())
