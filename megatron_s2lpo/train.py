"""S2L-PO training loop (Algorithm 1), read top to bottom.

    s2lpo train examples/tiny_cpu.yaml run.num_steps=20          # or
    python -m megatron_s2lpo.train examples/tiny_cpu.yaml --resume
    torchrun --nproc-per-node 2 -m megatron_s2lpo.train CONFIG learner.tensor_parallel_size=2

Per step i: sample prompts; split each group into G_w explorer + G_s learner samples
(`split_group`); collect and score both sources; optional PODS down-sampling over both
sources; group-relative advantages over the COMBINED group; the learner recomputes old
log-probs for every sample (and reference log-probs with a KL penalty); PPO epochs x
mini-batches of updates; weight sync into the learner's engine; metrics; checkpoint.
Components are built in `build.py`; global rank 0 drives engines and rewards and broadcasts
the scored groups, so every rank builds the same TrainBatch.
"""

from __future__ import annotations

import copy
import os
import sys
import time

import torch

from megatron_s2lpo.algo.advantages import group_advantages
from megatron_s2lpo.algo.batch import build_train_batch, masked_mean, mini_batch_rows, pods_downsample, take_rows
from megatron_s2lpo.algo.losses import PolicyLossConfig
from megatron_s2lpo.algo.schedule import schedule_share
from megatron_s2lpo.build import TrainerParts, build_trainer, sample_scores
from megatron_s2lpo.config import RunConfig, load_config, split_recipe
from megatron_s2lpo.rollout.engine import derive_seed
from megatron_s2lpo.step_metrics import mean_dicts, rollout_counts, source_metrics
from megatron_s2lpo.types import Source

COUNTERS = ("rollout_tokens/explorer", "rollout_tokens/learner", "rollout_flops/explorer", "rollout_flops/learner")


def loss_config(cfg: RunConfig) -> PolicyLossConfig:
    a = cfg.algo
    return PolicyLossConfig(clip_low=a.clip_low, clip_high=a.clip_high, clip_ratio_c=a.clip_ratio_c,
                            loss_agg_mode=a.loss_agg_mode, kl_coef=a.kl_coef, kl_estimator=a.kl_estimator,
                            entropy_coef=a.entropy_coef)


def resume(parts: TrainerParts) -> tuple[int, dict[str, float]]:
    """(last completed step, cumulative counters) from the latest checkpoint; (0, zeros) if none."""
    from megatron_s2lpo.learner.checkpoint import latest_checkpoint

    try:
        path = latest_checkpoint(parts.checkpoint_root)
    except (FileNotFoundError, ValueError):
        return 0, dict.fromkeys(COUNTERS, 0.0)
    state = parts.learner.load(path).trainer_state
    parts.sampler.load_state_dict(state["sampler"])
    if parts.prefetcher is not None:
        parts.prefetcher.load_state_dict(state.get("explorer_store", {}))
    step = int(state["step"])
    parts.sync.sync(version=step)  # the fresh engine gets the checkpoint's weights
    parts.sync.num_syncs = step  # parity checks every sync.parity_every steps, as without the restart
    return step, state["cumulative"]


def train(cfg: RunConfig) -> None:
    from megatron_s2lpo.build import CHECKPOINT_SUBDIR

    latest = os.path.join(cfg.run.output_dir, CHECKPOINT_SUBDIR, "latest")
    if not cfg.run.resume and os.path.isfile(latest):
        raise ValueError(f"{cfg.run.output_dir} already holds checkpoints of a run ({latest}); pass --resume "
                         "(run.resume=true) to continue it, or choose another run.output_dir")
    parts = build_trainer(cfg)
    try:
        _loop(parts)
    finally:
        parts.close()


def _loop(parts: TrainerParts) -> None:
    cfg, learner, algo = parts.config, parts.learner, parts.config.algo
    temperature = cfg.rollout.learner.sampling.temperature
    is_threshold = algo.is_threshold if algo.old_logprob == "behaviour" else None
    params = {Source.LEARNER: parts.learner_params, Source.EXPLORER: parts.explorer_params}
    start_step, cumulative = resume(parts) if cfg.run.resume else (0, dict.fromkeys(COUNTERS, 0.0))
    if parts.writer is not None:
        parts.writer.truncate_after(start_step)
    for step in range(start_step + 1, cfg.run.num_steps + 1):
        t0 = time.perf_counter()
        # 1. prompts, and the next steps' prompts for the explorer prefetcher (sampler copies)
        prompts = [parts.train_prompts[i] for i in parts.sampler.next_batch()]
        ahead = copy.deepcopy(parts.sampler) if parts.prefetcher is not None else None
        upcoming = [[parts.train_prompts[i] for i in ahead.next_batch()]
                    for _ in range(cfg.rollout.prefetch_steps)] if ahead is not None else []
        # 2. G_w explorer + G_s learner samples per prompt, scored (rank 0, broadcast)
        g_explorer, g_learner = _split(parts, step)
        groups, rollout_s, reward_s = parts.rollouts.collect(step, prompts, upcoming)
        counts = rollout_counts(groups, params)
        # 3. PODS: keep m of n per prompt, chosen over both sources
        if algo.pods.enabled:
            gen = torch.Generator().manual_seed(derive_seed(cfg.run.seed, "pods", step))
            groups = pods_downsample(groups, algo.pods.m, algo.pods.selector, gen)
        # 4. advantages over the combined group -> TrainBatch
        rewards = torch.tensor([g.rewards() for g in groups], dtype=torch.float32)  # (P, G)
        seq_adv = group_advantages(rewards, normalize_std=algo.normalize_std, eps=algo.adv_eps).flatten()
        batch = build_train_batch(groups, seq_adv, pad_token_id=0)
        # 5. old log-probs recomputed by the learner for ALL samples (+ reference for the KL)
        t1 = time.perf_counter()
        batch.old_logprobs, entropy = learner.compute_logprobs(batch, temperature, with_entropy=True)
        if algo.kl_coef > 0:
            batch.ref_logprobs = learner.compute_logprobs(batch, temperature, reference=True)
        # 6. PPO epochs x mini-batches
        t2 = time.perf_counter()
        updates = [learner.train_step(take_rows(batch, rows), loss_config=loss_config(cfg),
                                      temperature=temperature, is_threshold=is_threshold)
                   for _ in range(algo.ppo_epochs)
                   for rows in mini_batch_rows(batch.num_seqs, algo.mini_batches_per_step)]
        # 7. the learner's engine gets the new weights (version = step)
        t3 = time.perf_counter()
        synced = parts.sync.sync(version=step)
        t4 = time.perf_counter()
        # 8. metrics and checkpoint
        for key in COUNTERS:
            cumulative[key] += counts[key]
        metrics = {
            "alpha": schedule_share(step, algo.t_mix, schedule=algo.schedule, constant_share=algo.constant_share),
            "G_w": g_explorer, "G_s": g_learner, "weight_version": float(parts.sync.version),
            "entropy": masked_mean(entropy, batch.loss_mask),
            **source_metrics(batch, rewards.flatten(), seq_adv), **counts,
            **{f"cumulative/{k}": v for k, v in cumulative.items()},
            **{f"train/{k}": v for k, v in mean_dicts(updates).items()},
            **{k: v for k, v in synced.metrics().items() if k not in ("sync/seconds", "sync/gb_per_s")},
        }
        t5 = time.perf_counter()
        if cfg.run.eval_every and step % cfg.run.eval_every == 0 and parts.heldout_prompts:
            metrics["eval/avg_at_k"] = _heldout_accuracy(parts, step)
        t6 = time.perf_counter()
        save = step == cfg.run.num_steps or (cfg.run.save_every and step % cfg.run.save_every == 0)
        if save:
            _save(parts, step, cumulative)
        t7 = time.perf_counter()
        metrics.update({"time/rollout": rollout_s, "time/reward": reward_s, "time/old_logprob": t2 - t1,
                        "time/train": t3 - t2, "time/sync": t4 - t3, "time/eval": t6 - t5,
                        "time/checkpoint": t7 - t6, "time/step": t7 - t0,
                        "time/other": (t5 - t0) - rollout_s - reward_s - (t4 - t1)})
        if parts.writer is not None:
            parts.writer.write(step, metrics)
            _progress(step, cfg.run.num_steps, metrics)


def _split(parts: TrainerParts, step: int) -> tuple[int, int]:
    from megatron_s2lpo.algo.schedule import split_group

    a = parts.config.algo
    return split_group(step, a.num_generated_per_prompt, a.t_mix, schedule=a.schedule, rounding=a.rounding,
                       constant_share=a.constant_share)


def _heldout_accuracy(parts: TrainerParts, step: int) -> float:
    """avg@k Pass@1 of the learner's engine on the held-out prompts (rank 0; NaN elsewhere)."""
    from megatron_s2lpo.algo.passk import avg_at_k_pass1

    if parts.learner_engine is None:
        return float("nan")
    cfg = parts.config
    scores = sample_scores(parts.learner_engine, parts.heldout_prompts, cfg.run.eval_num_samples,
                           cfg.rollout.learner.sampling, parts.scorer, seed=cfg.run.seed, tag=f"eval{step}")
    return avg_at_k_pass1(scores)


def _save(parts: TrainerParts, step: int, cumulative: dict[str, float]) -> None:
    from megatron_s2lpo.learner.checkpoint import prune_checkpoints

    state = {"step": step, "sampler": parts.sampler.state_dict(), "cumulative": dict(cumulative),
             "explorer_store": parts.prefetcher.state_dict() if parts.prefetcher is not None else {}}
    parts.learner.save(parts.checkpoint_root, step=step, trainer_state=state)
    if parts.is_driver:
        prune_checkpoints(parts.checkpoint_root, parts.config.run.keep_checkpoints)


def _progress(step: int, num_steps: int, m: dict[str, float]) -> None:
    print(f"step {step}/{num_steps} alpha={m['alpha']:.3f} G_w/G_s={m['G_w']}/{m['G_s']} "
          f"reward expl={m['reward/explorer']:.3f} learn={m['reward/learner']:.3f} "
          f"clip={m.get('train/clip_frac', float('nan')):.3f} gnorm={m.get('train/grad_norm', float('nan')):.3f}"
          + (f" eval={m['eval/avg_at_k']:.3f}" if "eval/avg_at_k" in m else "")
          + f" {m['time/step']:.1f}s", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    resume_flag = "--resume" in args
    args = [a for a in args if a != "--resume"]
    config, overrides = split_recipe(args[0] if args else None, args[1:])
    try:
        train(load_config(config, overrides + (["run.resume=true"] if resume_flag else [])))
    except (ValueError, FileNotFoundError) as err:
        print(f"s2lpo train: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
