"""TP=2 checks against a TP=1 reference of the same weights, in one 2-process launch.

    python tests/distributed/launch.py tests/distributed/scripts/tp2_checks.py   # via pytest:
    pytest tests/distributed/test_learner_tp.py

Part 1 (TP=2, DP=1): vocab-parallel log-probs vs a full-vocabulary float64 reference; policy
log-probs; micro-batch invariance of loss and gradients (1, 2, 3 micro-batches); packed (THD) =
right-padded micro-batches and response-only chunked log-probs = the full-logits computation
(values, entropy, gradients); one GRPO step; the loss going down over steps. The initial weights are saved as a dist checkpoint.
Part 2 (TP=1, DP=2, same processes): load that checkpoint (TP=2 -> TP=1 resharding) and compare
log-probs, entropy, the first step's loss / grad norm and the log-probs after it; packed =
padded and chunked = full logits at TP=1 too; the distributed optimizer with overlapped grad
reduce / param gather and an offload() + onload() between steps = plain steps exactly. Both
parts check the memory planner's CPU estimate against measured peaks of three tiny shapes.
"""

from __future__ import annotations

import os
import shutil
import sys

import torch
import torch.distributed as dist

from common import (PLANNER_SHAPES, compare_results, fixed_batch, layout_results, max_abs_diff, planner_vs_measured,
                    run_check, shared_tmpdir, tiny_arch)

from megatron_s2lpo.algo.losses import PolicyLossConfig
from megatron_s2lpo.config.learner import LearnerConfig, OptimConfig
from megatron_s2lpo.learner.logprobs import token_logprobs
from megatron_s2lpo.learner.parallel import destroy_parallel, init_parallel

LOSS = PolicyLossConfig(clip_low=0.2, clip_high=0.28, loss_agg_mode="token-mean")
# per-sequence means and an entropy term: row structure and the entropy gradient matter
ROW_LOSS = PolicyLossConfig(loss_agg_mode="seq-mean-token-mean", entropy_coef=0.01)
TOL = 1e-5


def learner_config(tp: int) -> LearnerConfig:
    return LearnerConfig(tensor_parallel_size=tp, micro_batch_tokens=96, seq_length_multiple=1,
                         optim=OptimConfig(lr=2e-3, weight_decay=0.0, clip_grad=1.0))


def check_vocab_parallel(groups) -> dict:
    """Sliced logits on 2 TP ranks vs float64 log_softmax over the full real vocabulary."""
    torch.manual_seed(7)
    vocab, padded, temperature = 300, 512, 0.8
    logits = torch.randn(3, 9, padded) * 4
    logits[..., vocab:] = 30.0  # padded columns: must not matter
    tokens = torch.randint(0, vocab, (3, 9))
    grad_lp, grad_ent = torch.randn(3, 9), torch.randn(3, 9)
    width = padded // groups.tp_size
    piece = logits[..., groups.tp_rank * width:(groups.tp_rank + 1) * width].clone().requires_grad_(True)
    lp, ent = token_logprobs(piece, tokens, vocab_size=vocab, tp_group=groups.tp_group,
                             temperature=temperature, with_entropy=True)
    ((lp * grad_lp).sum() + (ent * grad_ent).sum()).backward()

    full = logits.double().requires_grad_(True)
    logp_all = torch.log_softmax(full[..., :vocab] / temperature, dim=-1)
    ref_lp = torch.zeros(3, 9, dtype=torch.float64)
    ref_ent = torch.zeros(3, 9, dtype=torch.float64)
    ref_lp[:, 1:] = logp_all[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)
    ref_ent[:, 1:] = -(logp_all[:, :-1].exp() * logp_all[:, :-1]).sum(-1)
    ((ref_lp * grad_lp.double()).sum() + (ref_ent * grad_ent.double()).sum()).backward()
    ref_grad = full.grad[..., groups.tp_rank * width:(groups.tp_rank + 1) * width]
    diffs = {"logprob": max_abs_diff(lp, ref_lp), "entropy": max_abs_diff(ent, ref_ent),
             "grad": max_abs_diff(piece.grad, ref_grad)}
    return {"ok": max(diffs.values()) < TOL, **diffs}


def grads_vector(learner) -> torch.Tensor:
    return torch.cat([p.main_grad.flatten() for chunk in learner.model for p in chunk.parameters()])


def check_micro_batch_invariance(learner, batch) -> dict:
    """Loss and gradients with 1, 2 and 4 micro-batches agree."""
    results = {}
    for budget in (8 * 24, 4 * 24, 2 * 24):  # the batch is 8 rows of <= 24 tokens
        metrics = learner.compute_gradients(batch, loss_config=LOSS, micro_batch_tokens=budget)
        results[int(metrics["num_micro_batches"])] = (metrics["loss"], grads_vector(learner))
    counts = sorted(results)
    loss_diff = max(abs(results[c][0] - results[counts[0]][0]) for c in counts)
    grad_diff = max(max_abs_diff(results[c][1], results[counts[0]][1]) for c in counts)
    return {"ok": len(counts) == 3 and counts[0] == 1 and loss_diff < 1e-6 and grad_diff < 1e-6,
            "micro_batch_counts": counts, "loss_diff": loss_diff, "grad_diff": grad_diff,
            "loss": results[1][0]}


def packed_equals_padded(learner, batch) -> dict:
    """THD-packed micro-batches (the local spec's packed attention core) = right-padded rows."""
    return compare_results(layout_results(learner, batch, ROW_LOSS, packed=True),
                           layout_results(learner, batch, ROW_LOSS, packed=False))


def chunked_equals_full_logits(learner, batch) -> dict:
    """Response-only chunked log-probs (and their gradients) = the full-logits computation."""
    from megatron_s2lpo.learner.logprobs import token_logprobs

    model = learner.policy_chunks[0]
    model.eval()
    with torch.no_grad():  # the whole (B, T, V_local) logits, as the learner computed them before
        logits = model(batch.tokens, torch.arange(batch.tokens.shape[1]).expand_as(batch.tokens).contiguous(), None)
        full, full_entropy = token_logprobs(logits, batch.tokens, vocab_size=learner.arch.vocab_size,
                                            tp_group=learner.groups.tp_group, temperature=0.7, with_entropy=True)
    mask = batch.loss_mask
    valid = (torch.arange(batch.tokens.shape[1]) < batch.seq_lens[:, None]).float()
    one_chunk = layout_results(learner, batch, ROW_LOSS, packed=True, chunk_tokens=0)
    chunked = layout_results(learner, batch, ROW_LOSS, packed=True, chunk_tokens=5)
    every = learner.compute_logprobs(batch, 0.7, all_tokens=True)
    diffs = {"chunked_vs_full": max_abs_diff(chunked["logprobs"], full * mask),
             "entropy_vs_full": max_abs_diff(chunked["entropy"], full_entropy * mask),
             "all_tokens_vs_full": max_abs_diff(every, full * valid),
             **{f"chunk5_vs_chunk0_{k}": v for k, v in compare_results(chunked, one_chunk).items()
                if k in ("loss", "grads")}}
    return {"ok": max(diffs.values()) < 1e-6, **diffs}


def overlap_and_offload(groups, root: str) -> dict:
    """Distributed optimizer over DP=2: steps with overlapped grad reduce / param gather, and an
    offload() + onload() between two steps, equal plain steps without offload exactly; offload()
    releases every storage of weights, grad buffers and Adam state and the learner refuses to run."""
    import dataclasses

    from megatron_s2lpo.learner import Learner
    from megatron_s2lpo.learner.offload import ddp_buffers, module_tensors, optimizer_tensors
    from megatron_s2lpo.planner.measure import storage_bytes

    runs, details = {}, {}
    for special in (False, True):
        base = learner_config(1)
        config = dataclasses.replace(base, overlap_grad_reduce=special, overlap_param_gather=special,
                                     optim=dataclasses.replace(base.optim, use_distributed_optimizer=True))
        learner = Learner(tiny_arch("qwen3"), config, groups=groups)
        learner.load(root, load_optimizer=False)
        batch = fixed_batch()
        batch.old_logprobs = learner.compute_logprobs(batch, 1.0)
        first = learner.train_step(batch, loss_config=LOSS)
        if special:
            tensors = lambda: module_tensors(learner.model) + sum(ddp_buffers(learner.model), []) + optimizer_tensors(  # noqa: E731
                learner.optimizer)
            details["bytes_before_offload"] = storage_bytes(tensors())
            learner.offload()
            details["bytes_offloaded"] = storage_bytes(tensors())
            try:
                learner.compute_logprobs(batch, 1.0)
                details["refused_while_offloaded"] = False
            except RuntimeError:
                details["refused_while_offloaded"] = True
            learner.onload()
        second = learner.train_step(batch, loss_config=LOSS)
        runs[special] = ([first["loss"], first["grad_norm"], second["loss"], second["grad_norm"]],
                         learner.compute_logprobs(batch, 1.0))
    diffs = {"metrics": max(abs(a - b) for a, b in zip(runs[False][0], runs[True][0])),
             "logprobs_after": max_abs_diff(runs[False][1], runs[True][1])}
    return {"ok": max(diffs.values()) == 0.0 and details["bytes_offloaded"] == 0 and details["bytes_before_offload"] > 0
            and details["refused_while_offloaded"], **diffs, **details}


def part_tp2(state: dict, ckpt_root: str) -> None:
    from megatron_s2lpo.learner import Learner

    groups = init_parallel(tensor_parallel_size=2, seed=11)
    run_check("tp2_vocab_parallel_matches_full_log_softmax", lambda: check_vocab_parallel(groups))
    learner = Learner(tiny_arch("qwen3"), learner_config(2), groups=groups)
    learner.save(ckpt_root)  # the weights both layouts start from
    batch = fixed_batch()
    state["lp"] = learner.compute_logprobs(batch, 1.0)
    state["lp_t"], state["ent_t"] = learner.compute_logprobs(batch, 0.7, with_entropy=True)
    batch.old_logprobs = state["lp"]
    run_check("tp2_micro_batch_invariance", lambda: check_micro_batch_invariance(learner, batch))
    run_check("tp2_packed_equals_padded", lambda: packed_equals_padded(learner, batch))
    run_check("tp2_chunked_logprobs_equal_full_logits", lambda: chunked_equals_full_logits(learner, batch))

    def recompute_same_gradients() -> dict:
        config = learner_config(2)
        config.recompute_granularity = "full"
        recomputing = Learner(tiny_arch("qwen3"), config, groups=groups)
        recomputing.load(ckpt_root)
        plain = learner.compute_gradients(batch, loss_config=LOSS)
        plain_grads = grads_vector(learner)
        again = recomputing.compute_gradients(batch, loss_config=LOSS)
        diffs = {"loss": abs(again["loss"] - plain["loss"]),
                 "grads": max_abs_diff(grads_vector(recomputing), plain_grads)}
        return {"ok": diffs["loss"] < 1e-6 and diffs["grads"] < 1e-6, **diffs}

    run_check("tp2_activation_recompute_same_gradients", recompute_same_gradients)

    def grpo_steps() -> dict:
        losses, first = [], None
        for _ in range(6):
            metrics = learner.train_step(batch, loss_config=LOSS)
            losses.append(metrics["loss"])
            if first is None:
                first = metrics
                state["step1"] = metrics
                state["lp_after"] = learner.compute_logprobs(batch, 1.0)
        return {"ok": losses[-1] < losses[0] - 1e-3, "losses": losses}

    run_check("tp2_grpo_steps_decrease_loss", grpo_steps)
    run_check("tp2_planner_within_25pct_of_measured_peak", lambda: planner_vs_measured(groups, 2))
    destroy_parallel(destroy_process_group=False)


def part_tp1(state: dict, ckpt_root: str) -> None:
    from megatron_s2lpo.learner import Learner

    groups = init_parallel(tensor_parallel_size=1, seed=11)  # DP=2
    learner = Learner(tiny_arch("qwen3"), learner_config(1), groups=groups)
    learner.load(ckpt_root)
    batch = fixed_batch()

    def logprobs_equal() -> dict:
        lp = learner.compute_logprobs(batch, 1.0)
        lp_t, ent_t = learner.compute_logprobs(batch, 0.7, with_entropy=True)
        diffs = {"logprobs": max_abs_diff(lp, state["lp"]), "logprobs_t0.7": max_abs_diff(lp_t, state["lp_t"]),
                 "entropy_t0.7": max_abs_diff(ent_t, state["ent_t"])}
        nonzero = bool((lp[:, 1:] != 0).any())
        return {"ok": nonzero and max(diffs.values()) < TOL, **diffs}

    run_check("tp2_logprobs_equal_tp1", logprobs_equal)
    batch.old_logprobs = state["lp"]
    run_check("tp1_packed_equals_padded", lambda: packed_equals_padded(learner, batch))
    run_check("tp1_chunked_logprobs_equal_full_logits", lambda: chunked_equals_full_logits(learner, batch))
    run_check("dp2_overlap_and_offload_continue_identically", lambda: overlap_and_offload(groups, ckpt_root))
    run_check("tp1_planner_within_25pct_of_measured_peak", lambda: planner_vs_measured(groups, 1, PLANNER_SHAPES[:2]))

    def step_equal() -> dict:
        metrics = learner.train_step(batch, loss_config=LOSS)
        lp_after = learner.compute_logprobs(batch, 1.0)
        ref = state["step1"]
        diffs = {"loss": abs(metrics["loss"] - ref["loss"]), "grad_norm": abs(metrics["grad_norm"] - ref["grad_norm"]),
                 "logprobs_after_step": max_abs_diff(lp_after, state["lp_after"])}
        moved = max_abs_diff(lp_after, state["lp"])
        # Adam's first step is ~lr * sign(grad): gradient entries near 0 amplify rounding, so
        # the post-step log-probs get a looser bound (the step itself moves them by ~0.5).
        return {"ok": diffs["loss"] < 1e-6 and diffs["grad_norm"] < 1e-5 and diffs["logprobs_after_step"] < 1e-4
                and moved > 1e-2, "moved": moved, **diffs}

    run_check("tp2_step_equals_tp1_dp2_step", step_equal)
    destroy_parallel(destroy_process_group=False)


def main() -> None:
    state: dict = {}
    root = shared_tmpdir("tp2_checks_")
    part_tp2(state, root)
    part_tp1(state, root)
    dist.barrier()
    if int(os.environ["RANK"]) == 0:
        shutil.rmtree(root, ignore_errors=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
