"""PP=2 (and PP=2 x VPP=2) checks against PP=1 on the same weights, in one 2-process launch.

    pytest tests/distributed/test_learner_pp.py

Part 1 (PP=2): loss and gradients with 1, 2 and 3-4 micro-batches (variable micro-batch shapes
through the pipeline); packed (THD) = right-padded micro-batches; the initial weights are saved. Part 2 (PP=2 x VPP=2, interleaved 1F1B):
load them and compute the same loss and gradients, with 3 micro-batches padded to 4. Part 3
(PP=1, DP=2): load them, compare loss, per-parameter gradients (by global layer name), log-probs
and one optimizer step with both pipeline layouts.
"""

from __future__ import annotations

import shutil
import sys

import torch
import torch.distributed as dist

from common import (compare_results, fixed_batch, global_grads, layout_results, max_abs_diff, run_check,
                    shared_tmpdir, tiny_arch)

from megatron_s2lpo.algo.losses import PolicyLossConfig
from megatron_s2lpo.config.learner import LearnerConfig, OptimConfig
from megatron_s2lpo.learner.parallel import destroy_parallel, init_parallel

LOSS = PolicyLossConfig(loss_agg_mode="seq-mean-token-mean", kl_coef=0.05, entropy_coef=0.01)
ARCH = tiny_arch("qwen3", num_layers=4, tie=True)
TOL = 1e-5


def learner_config(pp: int, vpp: int | None = None) -> LearnerConfig:
    return LearnerConfig(pipeline_parallel_size=pp, virtual_pipeline_parallel_size=vpp, micro_batch_tokens=96,
                         seq_length_multiple=1, optim=OptimConfig(lr=1e-3, weight_decay=0.01))


def prepared_batch(learner):
    batch = fixed_batch(seed=3)
    batch.old_logprobs = learner.compute_logprobs(batch, 1.0)
    noise = torch.randn(batch.tokens.shape, generator=torch.Generator().manual_seed(5))
    batch.ref_logprobs = batch.old_logprobs - 0.05 * noise
    batch.ref_logprobs *= batch.loss_mask
    return batch


def part_pp2(state: dict, root: str) -> None:
    from megatron_s2lpo.learner import Learner

    groups = init_parallel(pipeline_parallel_size=2, seed=5)
    learner = Learner(ARCH, learner_config(2), groups=groups)
    learner.save(root)
    batch = prepared_batch(learner)
    state["batch"] = batch

    def invariance() -> dict:
        results = {}
        for budget in (8 * 24, 4 * 24, 2 * 24):
            metrics = learner.compute_gradients(batch, loss_config=LOSS, micro_batch_tokens=budget)
            results[int(metrics["num_micro_batches"])] = (metrics, global_grads(learner.model))
        counts = sorted(results)
        base_metrics, base_grads = results[1]
        loss_diff = max(abs(results[c][0]["loss"] - base_metrics["loss"]) for c in counts)
        grad_diff = max(max_abs_diff(results[c][1][k], base_grads[k]) for c in counts for k in base_grads)
        state["pp2"] = results[2]
        dist.barrier()
        return {"ok": len(counts) == 3 and counts[0] == 1 and loss_diff < 1e-6 and grad_diff < 1e-6, "counts": counts,
                "loss_diff": loss_diff, "grad_diff": grad_diff, "loss": base_metrics["loss"],
                "metrics_on_first_stage": sorted(base_metrics)}

    run_check("pp2_micro_batch_invariance", invariance)
    run_check("pp2_packed_equals_padded", lambda: compare_results(layout_results(learner, batch, LOSS, packed=True),
                                                                  layout_results(learner, batch, LOSS, packed=False)))
    state["pp2_lp"] = learner.compute_logprobs(batch, 0.9)
    state["pp2_step"] = learner.train_step(batch, loss_config=LOSS)
    state["pp2_lp_after"] = learner.compute_logprobs(batch, 1.0)
    destroy_parallel(destroy_process_group=False)


def part_vpp(state: dict, root: str) -> None:
    from megatron_s2lpo.learner import Learner

    groups = init_parallel(pipeline_parallel_size=2, virtual_pipeline_parallel_size=2, seed=5)
    learner = Learner(ARCH, learner_config(2, 2), groups=groups)
    learner.load(root)
    metrics = learner.compute_gradients(state["batch"], loss_config=LOSS, micro_batch_tokens=72)
    state["vpp"] = (metrics, global_grads(learner.model))
    state["vpp_layers"] = sorted({k.split(".")[2] for k in state["vpp"][1] if k.startswith("decoder.layers.")})
    destroy_parallel(destroy_process_group=False)


def part_pp1(state: dict, root: str) -> None:
    from megatron_s2lpo.learner import Learner

    groups = init_parallel(seed=5)  # DP=2
    learner = Learner(ARCH, learner_config(1), groups=groups)
    learner.load(root)
    batch = state["batch"]
    metrics = learner.compute_gradients(batch, loss_config=LOSS)
    grads = global_grads(learner.model)

    def compare(label: str) -> dict:
        other_metrics, other_grads = state[label]
        diffs = {}
        for name, grad in other_grads.items():
            # The last stage's copy of the tied embedding gets the same (summed) gradient.
            ref_name = "embedding.word_embeddings.weight" if name == "output_layer.weight" else name
            diffs[name] = max_abs_diff(grad, grads[ref_name])
        worst = max(diffs, key=diffs.get)
        loss_diff = abs(other_metrics["loss"] - metrics["loss"])
        metric_diff = max(abs(other_metrics[k] - metrics[k]) for k in ("pg_loss", "kl_loss", "entropy", "clip_frac"))
        return {"ok": loss_diff < 1e-6 and metric_diff < 1e-5 and diffs[worst] < TOL and len(diffs) >= 5,
                "loss_diff": loss_diff, "metric_diff": metric_diff, "num_params": len(diffs),
                "worst_param": worst, "worst_grad_diff": diffs[worst],
                "num_micro_batches": other_metrics["num_micro_batches"]}

    run_check("pp2_loss_and_grads_equal_pp1", lambda: compare("pp2"))
    run_check("vpp2_loss_and_grads_equal_pp1", lambda: {**compare("vpp"), "layers_on_rank": state["vpp_layers"]})

    def logprobs_and_step() -> dict:
        lp = learner.compute_logprobs(batch, 0.9)
        step = learner.train_step(batch, loss_config=LOSS)
        lp_after = learner.compute_logprobs(batch, 1.0)
        diffs = {"logprobs": max_abs_diff(lp, state["pp2_lp"]),
                 "step_loss": abs(step["loss"] - state["pp2_step"]["loss"]),
                 "grad_norm": abs(step["grad_norm"] - state["pp2_step"]["grad_norm"]),
                 "logprobs_after_step": max_abs_diff(lp_after, state["pp2_lp_after"])}
        return {"ok": diffs["logprobs"] < TOL and diffs["step_loss"] < 1e-6 and diffs["grad_norm"] < 1e-5
                and diffs["logprobs_after_step"] < 1e-4, **diffs}

    run_check("pp2_logprobs_and_step_equal_pp1", logprobs_and_step)
    destroy_parallel(destroy_process_group=False)


def main() -> None:
    root = shared_tmpdir("pp2_checks_")
    state: dict = {}
    part_pp2(state, root)
    part_vpp(state, root)
    part_pp1(state, root)
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(root, ignore_errors=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
