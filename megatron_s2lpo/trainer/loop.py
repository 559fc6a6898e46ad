"""S2L-PO training loop (Algorithm 1), read top to bottom.

    s2lpo train examples/tiny_cpu.yaml run.num_steps=20          # or
    python -m megatron_s2lpo.trainer examples/tiny_cpu.yaml --resume
    torchrun --nproc-per-node 2 -m megatron_s2lpo.trainer CONFIG learner.tensor_parallel_size=2

Per step i: sample prompts; split each group into G_w explorer + G_s learner samples
(`split_group`); collect and score both sources; optional PODS down-sampling over both
sources; group-relative advantages over the COMBINED group; the learner recomputes old
log-probs for every sample (and reference log-probs with a KL penalty); PPO epochs x
mini-batches of updates; weight sync into the learner's engine; metrics; checkpoint.
Components are built in `build.py`; global rank 0 drives engines and rewards and broadcasts
the scored groups, so every rank builds the same TrainBatch. The groups and the weight push go
through `pipeline.py`: collected in the step (run.max_staleness=0), or during the step before,
one weight version behind and importance-weighted (1); the loop reads the same either way.

`algo.method` picks what the step trains on (docs/training.md, "Methods"):
  grpo        the above (S2L-PO with algo.t_mix > 0, plain GRPO with 0);
  forward_kl  the teacher (rollout.teacher) samples every group; the loss is the cross-entropy
              of its completions (against its top-k distribution with distill.top_k > 0);
  opd         the learner samples; the teacher scores every sampled token, and the reverse KL
              becomes per-token advantages of the PPO-clip loss (distill.opd_mode=advantage)
              or a direct loss (loss).
The learner's own sampling temperature follows algo.temperature (constant or linear anneal).
Multi-stage pipelines (`stages:`) run this loop once per stage (stages.py); run.py is the entry.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from megatron_s2lpo.algo.advantages import group_advantages
from megatron_s2lpo.algo.batch import (build_train_batch, masked_mean, pods_downsample, take_rows,
                                       trainable_mini_batches)
from megatron_s2lpo.algo.losses import PolicyLossConfig
from megatron_s2lpo.algo.schedule import schedule_share
from megatron_s2lpo.config import RunConfig
from megatron_s2lpo.rollout.engine import derive_seed
from megatron_s2lpo.trainer.build import (TrainerParts, build_trainer, eval_sampling, learner_temperature, mix_settings,
                                          sample_scores)
from megatron_s2lpo.trainer.metrics import (behaviour_mismatch, importance_metrics, json_safe, mean_dicts,
                                            pods_counts, rollout_counts, source_metrics, staleness_metrics)
from megatron_s2lpo.trainer.run_dir import check_run_dir
from megatron_s2lpo.trainer.stop_signal import RunStopped, received_signal, stop_requested
from megatron_s2lpo.types import SOURCE_CODES, Source

COUNTERS = ("rollout_tokens/explorer", "rollout_tokens/learner", "rollout_flops/explorer", "rollout_flops/learner")


def loss_config(cfg: RunConfig) -> PolicyLossConfig:
    a = cfg.algo
    return PolicyLossConfig(clip_low=a.clip_low, clip_high=a.clip_high, clip_ratio_c=a.clip_ratio_c,
                            loss_agg_mode=a.loss_agg_mode, kl_coef=a.kl_coef, kl_estimator=a.kl_estimator,
                            entropy_coef=a.entropy_coef)


def resume(parts: TrainerParts) -> tuple[int, dict[str, float], dict[str, float]]:
    """(last completed step, cumulative counters, that step's metrics) from the newest loadable
    checkpoint (run_dir.check_run_dir has made sure there is one), and the rollouts it holds for
    the next step (pipeline.py)."""
    loaded = parts.learner.load(parts.checkpoint_root)
    state = loaded.trainer_state
    parts.sampler.load_state_dict(state["sampler"])
    if parts.prefetcher is not None:
        parts.prefetcher.load_state_dict(state.get("explorer_store", {}))
    step = int(state["step"])
    parts.pipeline.resume(loaded.path, step)
    parts.sync.sync(version=step, resume=True)  # the engine gets the checkpoint's weights, also over later ones
    parts.sync.num_syncs = step  # parity checks every sync.parity_every steps, as without the restart
    return step, state["cumulative"], state.get("metrics") or {}


def run_training(cfg: RunConfig, *, export_dir: str | None = None) -> None:
    """Run the single run `cfg` (no `stages:`; run.py dispatches those to stages.py). export_dir:
    afterwards write the trained policy there as a Hugging Face directory (atomically)."""
    resuming = check_run_dir(cfg.run.output_dir, resume=cfg.run.resume)  # refuses to start over on a used run
    parts = build_trainer(cfg)
    try:
        _loop(parts, resuming)
        if export_dir:
            parts.export_hf(export_dir)
    finally:
        parts.close()


def importance_correction(cfg: RunConfig) -> tuple[float | None, tuple[int, ...] | None]:
    """(truncated-IS cap, source codes of the rows it weights): every row in behaviour mode; the
    learner's own samples when its engine samples at another precision (algo.precision_correction)
    or one weight version behind (run.max_staleness=1, always)."""
    from megatron_s2lpo.config.learner import precision_differs

    algo = cfg.algo
    if algo.old_logprob == "behaviour":
        return algo.is_threshold, None
    on = algo.precision_correction
    if on is None:
        on = precision_differs(cfg.learner, cfg.rollout.learner)
    if cfg.run.max_staleness:  # decoupled PPO: the proximal policy is the recompute, one version ahead
        on = True
    return (algo.is_threshold, (SOURCE_CODES[Source.LEARNER],)) if on and algo.is_threshold else (None, None)


def objective(cfg: RunConfig) -> str:
    """The learner's training objective for algo.method (learner/step.py OBJECTIVES)."""
    method = cfg.algo.method
    if method == "forward_kl":
        return "forward_kl"
    if method == "opd" and cfg.algo.distill.opd_mode == "loss":
        return "reverse_kl"
    return "policy"


def _start(parts: TrainerParts, resuming: bool) -> tuple[int, dict[str, float]]:
    """(last completed step, cumulative counters): a resumed run's checkpoint, its metrics file cut
    back to it, or step 0 (with the held-out evaluation before training if asked)."""
    cfg = parts.config
    start_step, cumulative, saved_metrics = 0, dict.fromkeys(COUNTERS, 0.0), {}
    if resuming:
        start_step, cumulative, saved_metrics = resume(parts)
    if parts.writer is not None and start_step:
        last_logged = parts.writer.truncate_after(start_step)  # the steps after the checkpoint run again
        if saved_metrics and last_logged != start_step:
            # killed between the checkpoint and the metrics line: log the step from the checkpoint
            parts.writer.write(start_step, saved_metrics)
    if cfg.run.eval_every and parts.heldout_prompts and cfg.run.eval_at_start and start_step == 0:
        accuracy = _heldout_accuracy(parts, 0)
        if parts.writer is not None:
            parts.writer.write(0, {"eval/avg_at_k": accuracy})
            print(f"step 0/{cfg.run.num_steps} eval={accuracy:.3f}", flush=True)
    return start_step, cumulative


def _loop(parts: TrainerParts, resuming: bool) -> None:
    cfg, learner, algo, pipeline = parts.config, parts.learner, parts.config.algo, parts.pipeline
    distill, train_objective = algo.distill, objective(cfg)
    t_mix, schedule, share = mix_settings(cfg)
    is_threshold, is_sources = importance_correction(cfg)
    mismatch_sources = is_sources if is_threshold is not None else (SOURCE_CODES[Source.LEARNER],)
    params = {Source.LEARNER: parts.learner_params, Source.EXPLORER: parts.explorer_params}
    start_step, cumulative = _start(parts, resuming)
    evaluates = bool(cfg.run.eval_every and parts.heldout_prompts)
    for step in range(start_step + 1, cfg.run.num_steps + 1):
        t0 = time.perf_counter()
        temperature = learner_temperature(cfg, step)
        # 1-2. the step's prompts, G_w explorer + G_s learner samples of each, scored (pipeline.py:
        # rank 0 collects, every rank receives; with run.max_staleness=1 collected during step i-1)
        g_explorer, g_learner = _split(parts, step)
        groups = pipeline.next_batch(step)
        counts = rollout_counts(groups, params, pipeline.discarded_tokens())
        # 3. PODS: keep m of n per prompt, chosen over both sources
        if algo.pods.enabled:
            gen = torch.Generator().manual_seed(derive_seed(cfg.run.seed, "pods", step))
            kept = pods_downsample(groups, algo.pods.m, algo.pods.selector, gen)
            counts.update(pods_counts(groups, kept))
            groups = kept
        # 4. advantages over the combined group -> TrainBatch
        rewards = torch.tensor([g.rewards() for g in groups], dtype=torch.float32)  # (P, G)
        seq_adv = group_advantages(rewards, normalize_std=algo.normalize_std, eps=algo.adv_eps).flatten()
        batch = build_train_batch(groups, seq_adv, pad_token_id=0,
                                  routing_top_k=learner.arch.num_experts_per_tok or None)
        # 5. old log-probs recomputed by the learner for ALL samples (+ reference for the KL)
        t1 = time.perf_counter()
        batch.old_logprobs, entropy = learner.compute_logprobs(batch, temperature, with_entropy=True)
        if algo.kl_coef > 0:
            batch.ref_logprobs = learner.compute_logprobs(batch, temperature, reference=True)
        routing_metrics = _routing_metrics(parts, step, batch, temperature)  # MoE: replay on / off
        # 5b. distillation: the teacher's scores of every token (opd; forward_kl with top-k)
        teacher_s, distill_metrics = 0.0, {}
        if algo.method == "opd" or (algo.method == "forward_kl" and distill.top_k > 0):
            teacher_s, distill_metrics = _teacher_supervision(parts, step, groups, batch)
        # 6. PPO epochs x mini-batches (truncated importance weights on off-policy rows)
        t2 = time.perf_counter()
        updates = [learner.train_step(take_rows(batch, rows), loss_config=loss_config(cfg),
                                      temperature=temperature, is_threshold=is_threshold, is_sources=is_sources,
                                      objective=train_objective, distill_coef=distill.opd_coef)
                   for _ in range(algo.ppo_epochs)
                   for rows in trainable_mini_batches(batch, algo.mini_batches_per_step)]
        # 7. the learner's engine gets the new weights (version = step)
        t3 = time.perf_counter()
        synced = pipeline.push_weights(step)
        # 8. metrics and checkpoint
        for key in COUNTERS:
            cumulative[key] += counts[key]
        flow = pipeline.step_metrics()
        metrics = {
            "alpha": schedule_share(step, t_mix, schedule=schedule, constant_share=share),
            "G_w": g_explorer, "G_s": g_learner, "weight_version": float(parts.sync.version),
            "temperature": temperature, **distill_metrics,
            "entropy": masked_mean(entropy, batch.loss_mask),
            **source_metrics(batch, rewards.flatten(), seq_adv), **counts, **staleness_metrics(groups, step),
            **{f"cumulative/{k}": v for k, v in cumulative.items()},
            **{f"train/{k}": v for k, v in mean_dicts(updates).items()},
            **importance_metrics(batch, is_threshold, is_sources),
            "train/behaviour_mismatch": behaviour_mismatch(batch, mismatch_sources), **routing_metrics,
            **{k: v for k, v in synced.metrics().items() if k not in ("sync/seconds", "sync/gb_per_s")},
        }
        t5 = time.perf_counter()
        if evaluates and (step % cfg.run.eval_every == 0 or step == cfg.run.num_steps):
            metrics["eval/avg_at_k"] = _heldout_accuracy(parts, step)
        t6 = time.perf_counter()
        metrics.update({**flow, "time/teacher": teacher_s, "time/old_logprob": t2 - t1 - teacher_s,
                        "time/train": t3 - t2, "time/eval": t6 - t5,  # time/sync: without waiting (pipeline)
                        "time/other": (t5 - t0) - flow["time/wait_rollout"] - (t3 - t1) - flow["time/sync"]})
        stopping = stop_requested() and step < cfg.run.num_steps  # every rank agrees
        save = step == cfg.run.num_steps or (cfg.run.save_every and step % cfg.run.save_every == 0)
        if save or stopping:  # the step's metrics travel with its checkpoint; the last one is committed now
            _save(parts, step, cumulative, metrics, wait=stopping or step == cfg.run.num_steps)
        t7 = time.perf_counter()
        metrics.update({"time/checkpoint": t7 - t6, "time/step": t7 - t0})
        if parts.writer is not None:
            parts.writer.write(step, metrics)
            _progress(step, cfg.run.num_steps, metrics)
        if stopping:
            raise RunStopped(step, received_signal())


def _split(parts: TrainerParts, step: int) -> tuple[int, int]:
    from megatron_s2lpo.algo.schedule import split_group

    a = parts.config.algo
    t_mix, schedule, share = mix_settings(parts.config)
    return split_group(step, a.num_generated_per_prompt, t_mix, schedule=schedule, rounding=a.rounding,
                       constant_share=share)


def _teacher_supervision(parts: TrainerParts, step: int, groups: list, batch: Any) -> tuple[float, dict[str, float]]:
    """Teacher scores into `batch` (rank 0 scores, every rank receives); OPD advantages.

    Returns (seconds, metrics). opd: batch.teacher_logprobs; in advantage mode the per-token
    advantages coef * (teacher - old) (+ reward_weight x the GRPO advantage) replace
    batch.advantages. forward_kl with distill.top_k: batch.teacher_topk_*.
    """
    from megatron_s2lpo.algo.distill import opd_token_advantages
    from megatron_s2lpo.rollout.scoring import align_scores
    from megatron_s2lpo.sync.collective import run_on_driver

    cfg = parts.config
    distill = cfg.algo.distill
    top_k = distill.top_k if cfg.algo.method == "forward_kl" else 0
    start = time.perf_counter()

    def score() -> tuple:
        parts.teacher_scorer.new_step(step)
        rollouts = [r for g in groups for r in g.rollouts]
        scores = parts.teacher_scorer.score([(r.prompt_ids, r.response_ids) for r in rollouts])
        aligned = align_scores(scores, [len(r.prompt_ids) for r in rollouts], batch.tokens.shape[1], top_k)
        counts = {k: v for k, v in parts.teacher_scorer.metrics().items() if k != "teacher/seconds"}
        return (*aligned, counts)  # the seconds are time/teacher

    teacher, top_ids, top_logprobs, metrics = run_on_driver(score, parts.learner.groups)
    seconds = time.perf_counter() - start
    if cfg.algo.method == "forward_kl":
        batch.teacher_topk_ids, batch.teacher_topk_logprobs = top_ids, top_logprobs
        return seconds, metrics
    batch.teacher_logprobs = teacher
    gap = batch.old_logprobs - teacher  # (B, T) per-token reverse-KL estimate (k1) at the old policy
    metrics["distill/reverse_kl"] = masked_mean(gap, batch.loss_mask)
    if distill.opd_mode == "advantage":
        dense = opd_token_advantages(batch.old_logprobs, teacher, batch.loss_mask, coef=distill.opd_coef,
                                     clip=distill.opd_clip)
        batch.advantages = dense + distill.reward_weight * batch.advantages
        metrics["distill/advantage"] = masked_mean(dense, batch.loss_mask)
    return seconds, metrics


def _routing_metrics(parts: TrainerParts, step: int, batch: Any, temperature: float) -> dict[str, float]:
    """Every learner.routing_metrics_every steps, for a mixture-of-experts learner whose samples carry
    their engine's routing: how often the learner's router picks the engine's experts on the
    learner's samples (routing/overlap, routing/exact), and the mean |log-prob - behaviour log-prob|
    over their loss tokens with the learner routing freely (routing/mismatch_free) and replaying
    the engine's experts (routing/mismatch_replayed). Two extra no-grad passes (one with r3, whose
    old-log-prob pass is the replayed one). Explorer samples have no engine routing of this model."""
    from megatron_s2lpo.learner.routing import agreement

    learner, every = parts.learner, parts.config.learner.routing_metrics_every
    if batch.routed_experts is None or not every or step % every:
        return {}
    rows = (batch.sources == SOURCE_CODES[Source.LEARNER]).float().unsqueeze(1)  # (B, 1)
    mask = batch.loss_mask * rows
    free = learner.compute_logprobs(batch, temperature, routing="free")
    match = agreement(learner.last_routing, batch.routed_experts, rows.expand_as(batch.loss_mask))
    if parts.config.learner.routing_replay == "r3":
        replayed = batch.old_logprobs
    else:
        replayed = learner.compute_logprobs(batch, temperature, routing="engine")
    gap = lambda lp: masked_mean((lp - batch.behaviour_logprobs).abs(), mask)  # noqa: E731
    return {"routing/overlap": match["overlap"], "routing/exact": match["exact"],
            "routing/mismatch_free": gap(free), "routing/mismatch_replayed": gap(replayed)}


def _heldout_accuracy(parts: TrainerParts, step: int) -> float:
    """avg@k Pass@1 of the learner's engine on the held-out prompts (rank 0; NaN elsewhere).

    Every evaluation draws the same per-(prompt, sample) seeds, so two evaluations of one model
    agree exactly and differences between steps come from the weights, not the sampler."""
    from megatron_s2lpo.algo.passk import avg_at_k_pass1

    if parts.learner_engine is None:
        return float("nan")
    cfg = parts.config
    scores = sample_scores(parts.learner_engine, parts.heldout_prompts, cfg.run.eval_num_samples,
                           eval_sampling(cfg), parts.scorer, seed=cfg.run.seed, tag="eval")
    return avg_at_k_pass1(scores)


def _save(parts: TrainerParts, step: int, cumulative: dict[str, float], metrics: dict[str, float], *,
          wait: bool) -> None:
    """Checkpoint `step` with the trainer's state and the step's metrics (all but time/checkpoint
    and time/step), which a resume logs if the run died before writing them. With asynchronous
    saves (learner.checkpoint.async_save) `wait` commits it before returning."""
    from megatron_s2lpo.learner.checkpoint import prune_checkpoints

    state = {"step": step, "sampler": parts.sampler.state_dict(), "cumulative": dict(cumulative),
             "explorer_store": parts.prefetcher.state_dict() if parts.prefetcher is not None else {},
             "metrics": {k: json_safe(v) for k, v in metrics.items()}}
    parts.learner.save(parts.checkpoint_root, step=step, trainer_state=state, wait=wait,
                       extra_files=parts.pipeline.checkpoint_files())  # the next step's rollouts, if ahead
    if parts.is_driver:
        prune_checkpoints(parts.checkpoint_root, parts.config.run.keep_checkpoints)


def _progress(step: int, num_steps: int, m: dict[str, float]) -> None:
    distill = "".join(f" {key.split('/')[-1]}={m[key]:.3f}" for key in ("train/nll", "distill/reverse_kl")
                      if key in m)
    print(f"step {step}/{num_steps} alpha={m['alpha']:.3f} G_w/G_s={m['G_w']}/{m['G_s']} "
          f"T={m['temperature']:.2f} reward expl={m['reward/explorer']:.3f} learn={m['reward/learner']:.3f}{distill} "
          f"clip={m.get('train/clip_frac', float('nan')):.3f} gnorm={m.get('train/grad_norm', float('nan')):.3f}"
          + (f" eval={m['eval/avg_at_k']:.3f}" if "eval/avg_at_k" in m else "")
          + f" {m['time/step']:.1f}s", flush=True)
