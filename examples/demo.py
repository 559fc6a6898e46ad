"""S2L-PO on the synthetic arithmetic task, with two tabular policies standing in for the models.

    make demo                                   # or:
    .venv/bin/python examples/demo.py --steps 40 --t-mix 20

What is real here: the synthetic task and its held-out split (`data/`), the prompt sampler, the
explorer/learner split of every group (`algo.schedule.split_group`), group-relative advantages
over the combined group (`algo.advantages`), the PPO-clip loss with the learner's recomputed old
log-probs on every sample, explorer samples included (`algo.losses`), and math-verify rewards
scored in worker processes (`reward.math`).

What stands in for the models: each "model" is a categorical distribution over how far its
answer lands from the true value (offsets -K..K), one per operator. The learner starts cold (it
almost never lands on offset 0); the frozen explorer is right about a quarter of the time. A
completion is the text `\\boxed{value}`, scored by math-verify against the ground truth. With a
cold learner, plain GRPO (t_mix=0) rarely sees a correct sample, so most groups have zero
advantage; S2L-PO's explorer share supplies the positive samples. The demo trains both runs
from the same seed and prints held-out accuracy (avg@4 Pass@1) per step.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_s2lpo.algo.advantages import group_advantages  # noqa: E402
from megatron_s2lpo.algo.losses import PolicyLossConfig, loss_normalizer, policy_loss  # noqa: E402
from megatron_s2lpo.algo.schedule import explorer_share, split_group  # noqa: E402
from megatron_s2lpo.data import SyntheticTaskConfig, PromptSampler, make_arithmetic_prompts  # noqa: E402
from megatron_s2lpo.reward.math import MathScorer  # noqa: E402

OFFSETS = torch.arange(-4, 5)  # answer = truth + offset
OPERATORS = "+-"


class TabularPolicy:
    """Logits over answer offsets, one row per operator: (num_operators, num_offsets)."""

    def __init__(self, correct_logit: float, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        logits = torch.randn(len(OPERATORS), len(OFFSETS), generator=gen) * 0.5
        logits[:, OFFSETS == 0] = correct_logit
        self.logits = logits.requires_grad_(True)

    def logprobs(self, ops: torch.Tensor) -> torch.Tensor:  # (N,) -> (N, num_offsets)
        return torch.log_softmax(self.logits[ops], dim=-1)

    def sample(self, ops: torch.Tensor, gen: torch.Generator) -> torch.Tensor:  # (N,) -> (N,)
        probs = self.logprobs(ops).exp().detach()
        return torch.multinomial(probs, 1, generator=gen).squeeze(1)


def op_index(prompt) -> int:
    return next(OPERATORS.index(ch) for ch in prompt.metadata["problem"] if ch in OPERATORS)


def completions(prompts, ops_of_prompt, offset_idx) -> list[str]:
    return [f"The answer is \\boxed{{{int(p.ground_truth) + int(OFFSETS[o])}}}."
            for p, o in zip(prompts, offset_idx.tolist())]


def heldout_accuracy(policy, prompts, scorer, gen, k: int = 4) -> float:
    reps = [p for p in prompts for _ in range(k)]
    ops = torch.tensor([op_index(p) for p in reps])
    with torch.no_grad():
        picks = policy.sample(ops, gen)
    rewards = scorer.score(completions(reps, ops, picks), [p.ground_truth for p in reps])
    return sum(rewards) / len(rewards)


def run(args, t_mix: int, scorer: MathScorer) -> list[dict]:
    task = SyntheticTaskConfig(num_digits=1, num_terms=2, operators=OPERATORS, seed=args.seed)
    train = make_arithmetic_prompts(task, split="train", num_prompts=120)
    heldout = make_arithmetic_prompts(task, split="heldout", num_prompts=16)
    sampler = PromptSampler(len(train), args.prompts_per_step, seed=args.seed)
    learner = TabularPolicy(correct_logit=-3.0, seed=args.seed)
    explorer = TabularPolicy(correct_logit=1.0, seed=args.seed + 1)
    optimizer = torch.optim.Adam([learner.logits], lr=args.lr)
    loss_config = PolicyLossConfig(clip_low=0.2, clip_high=0.28)
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for step in range(1, args.steps + 1):
        prompts = [train[i] for i in sampler.next_batch()]
        g_explorer, g_learner = split_group(step, args.group_size, t_mix)
        # Group layout per prompt: g_explorer explorer samples, then g_learner learner samples.
        reps = [p for p in prompts for _ in range(args.group_size)]
        ops = torch.tensor([op_index(p) for p in reps])
        is_explorer = torch.tensor([j < g_explorer for _ in prompts for j in range(args.group_size)])
        with torch.no_grad():
            picks = torch.where(is_explorer, explorer.sample(ops, gen), learner.sample(ops, gen))
        rewards = torch.tensor(scorer.score(completions(reps, ops, picks), [p.ground_truth for p in reps]))
        adv = group_advantages(rewards.view(len(prompts), args.group_size)).reshape(-1, 1)  # (B, 1)
        mask = torch.ones_like(adv)
        with torch.no_grad():  # the learner's recomputed old log-probs, explorer samples included
            old = learner.logprobs(ops).gather(1, picks[:, None])
        logp = learner.logprobs(ops).gather(1, picks[:, None])
        loss, metrics = policy_loss(logp, old, adv, mask, config=loss_config,
                                    normalizer=loss_normalizer(mask, loss_config.loss_agg_mode))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        explorer_reward = rewards[is_explorer].mean().item() if g_explorer else float("nan")
        learner_reward = rewards[~is_explorer].mean().item() if g_learner else float("nan")
        rows.append({
            "step": step, "alpha": explorer_share(step, t_mix), "g_explorer": g_explorer,
            "g_learner": g_learner, "reward_explorer": explorer_reward, "reward_learner": learner_reward,
            "heldout_acc": heldout_accuracy(learner, heldout, scorer, gen),
            "clip_frac": metrics["clip_frac"].item(),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--t-mix", type=int, default=15)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with MathScorer(num_workers=2, timeout_s=5.0) as scorer:
        s2lpo = run(args, args.t_mix, scorer)
        grpo = run(args, 0, scorer)
    print(f"\nS2L-PO (t_mix={args.t_mix}) vs GRPO (t_mix=0), G={args.group_size}, "
          f"{args.prompts_per_step} prompts/step; held-out accuracy is avg@4 Pass@1\n")
    print(f"{'step':>4} {'alpha':>6} {'G_w/G_s':>8} {'r_expl':>7} {'r_learn':>8} {'acc S2L-PO':>11} {'acc GRPO':>9}")
    for a, b in zip(s2lpo, grpo):
        print(f"{a['step']:>4} {a['alpha']:>6.3f} {a['g_explorer']:>3}/{a['g_learner']:<4} "
              f"{a['reward_explorer']:>7.3f} {a['reward_learner']:>8.3f} {a['heldout_acc']:>11.3f} "
              f"{b['heldout_acc']:>9.3f}")
    print(f"\nfinal held-out accuracy: S2L-PO {s2lpo[-1]['heldout_acc']:.3f}, GRPO {grpo[-1]['heldout_acc']:.3f}")
    print(f"math-verify: {scorer.num_scored} completions scored, {scorer.num_timeouts} timeouts")


if __name__ == "__main__":
    main()
