"""Rank 0: one step's scored groups, over the rounds of DAPO's dynamic sampling.

    outcome = collect_step(stage, step, prompts, draw, temperature, upcoming, config)

With algo.dynamic_sampling off, one round: the step's prompts, collected and scored, every group
trained on. On, the step collects in rounds, as verl's DAPO trainer does
(recipe/dapo/dapo_ray_trainer.py, `fit`): each round takes `oversample` sampler batches of prompts
(the first round the batch the pipeline drew, plus oversample - 1 more), collects and scores their
groups from BOTH sources (the S2L-PO split of the step; explorer samples from the explorer store
or server), and keeps the groups whose filter metric varies (algo/group_filter.py), in order,
until the step has data.prompts_per_step of them; surplus informative groups of the last round
are dropped. After algo.dynamic_sampling.max_rounds rounds the step trains on what it has (verl
raises instead), or, with no informative group at all, on its first round's groups; the log and
`dynamic/cap_hit` say so.

Every prompt a round draws comes from the run's prompt sampler, so the sampler's state after a
step accounts for all its rounds: a checkpoint (and, one step ahead, the pending groups) resumes
the exact sequence of prompts. A step's k-th prompt over all its rounds is sampled with the seeds
of index k (rollout/collector.py), so a repeated step draws the same samples.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_s2lpo.algo.group_filter import fill_batch, filter_values, informative_groups
from megatron_s2lpo.config.algo import DynamicSamplingConfig
from megatron_s2lpo.reward.overlong import overlong_metrics
from megatron_s2lpo.types import Group, Prompt, Source

logger = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class ScoredRound:
    """One collection of groups, scored (RolloutStage.collect)."""

    groups: list[Group]
    scores: list[list[float]]  # (P, G): the verifier's rewards, before reward shaping
    rollout_s: float
    reward_s: float
    counts: dict[str, float] = field(default_factory=dict)  # overlong/* counts of reward shaping


@dataclass(kw_only=True, slots=True)
class Collected:
    """A step's collection as the pipeline hands it to every rank."""

    groups: list[Group]  # what the step trains on
    rollout_s: float
    reward_s: float
    metrics: dict[str, float] = field(default_factory=dict)  # dynamic/* and overlong/*
    # tokens (prompt + response) generated this step but not trained on, per Source value
    discarded_tokens: dict[str, float] = field(default_factory=dict)
    sampler_state: dict | None = None  # the prompt sampler after the step's rounds (rank 0's)


def collect_step(stage: Any, step: int, prompts: list[Prompt], draw: Callable[[], list[Prompt]],
                 temperature: float, upcoming: Sequence[list[Prompt]],
                 config: DynamicSamplingConfig) -> Collected:
    """Step `step`'s groups (module docstring). `prompts`: the batch the pipeline drew for it;
    `draw()`: the sampler's next batch; `upcoming`: later steps' prompts to prefetch (off only)."""
    if not config.enabled:
        scored = stage.collect(step, prompts, upcoming, temperature)
        return Collected(groups=scored.groups, rollout_s=scored.rollout_s, reward_s=scored.reward_s,
                         metrics=overlong_metrics(scored.counts))
    target = len(prompts)
    kept: list[Group] = []
    first_round: list[Group] = []
    stats: dict[str, float] = {}
    counts: dict[str, float] = {}
    rollout_s = reward_s = 0.0
    generated: list[Group] = []
    first_index = 0  # the step's prompts collected in earlier rounds
    for round_index in range(config.max_rounds):
        batch = list(prompts) if round_index == 0 else []
        while len(batch) < config.oversample * target:
            batch += draw()
        if round_index:
            print(f"step {step} round {round_index + 1}: {len(kept)} of {target} groups informative after "
                  f"{round_index} round(s); sampling {len(batch)} more prompts", flush=True)
        scored = stage.collect(step, batch, (), temperature, first_index=first_index)
        first_index += len(batch)
        rollout_s += scored.rollout_s
        reward_s += scored.reward_s
        _add(counts, scored.counts)
        generated += scored.groups
        first_round = first_round or scored.groups
        informative = _round_stats(stats, scored, config.metric)
        kept, surplus = fill_batch(kept, scored.groups, informative, target)
        _add(stats, {"dynamic/groups_surplus": float(surplus)})
        if len(kept) >= target:
            break
    cap_hit = len(kept) < target
    if cap_hit:
        what = (f"{len(kept)} informative groups of the {target} asked for; training on them" if kept else
                f"no informative group; training on the first round's {len(first_round)} groups (zero advantage)")
        logger.warning("step %d: after %d rounds (algo.dynamic_sampling.max_rounds) %s", step, config.max_rounds, what)
    trained = kept or first_round
    stats.update({"dynamic/rounds": float(round_index + 1), "dynamic/groups_trained": float(len(trained)),
                  "dynamic/cap_hit": float(cap_hit)})
    discarded = _discarded_tokens(generated, trained)
    stats.update({f"dynamic/extra_tokens/{source}": tokens for source, tokens in discarded.items()})
    return Collected(groups=trained, rollout_s=rollout_s, reward_s=reward_s,
                     metrics={**stats, **overlong_metrics(counts)}, discarded_tokens=discarded)


def _round_stats(stats: dict[str, float], scored: ScoredRound, metric: str) -> list[bool]:
    """Which groups of the round are informative; adds the round's counts to `stats`:
    generated / informative / filtered groups, the filtered ones by outcome (every sample solved,
    none solved) and by source mix, and the informative groups whose learner samples alone
    would have been filtered (the explorer's samples made them informative)."""
    rewards = torch.tensor([g.rewards() for g in scored.groups], dtype=torch.float64)  # (P, G)
    scores = torch.tensor(scored.scores, dtype=torch.float64)  # (P, G)
    values = filter_values(metric, rewards, scores)
    informative = informative_groups(values).tolist()
    solved = scores >= 1.0
    counts = dict.fromkeys(("groups_generated", "groups_informative", "groups_filtered", "filtered_solved",
                            "filtered_unsolved", "filtered_mixed", "filtered_explorer_only",
                            "filtered_learner_only", "informative_via_explorer"), 0.0)
    for k, group in enumerate(scored.groups):
        learner = [j for j, r in enumerate(group.rollouts) if r.source is Source.LEARNER]
        num_explorer = len(group.rollouts) - len(learner)
        counts["groups_generated"] += 1
        if informative[k]:
            counts["groups_informative"] += 1
            learner_values = values[k, learner]
            if num_explorer and learner and bool(learner_values.amax() == learner_values.amin()):
                counts["informative_via_explorer"] += 1
            continue
        counts["groups_filtered"] += 1
        counts["filtered_solved"] += bool(solved[k].all())
        counts["filtered_unsolved"] += bool((~solved[k]).all())
        mix = "mixed" if num_explorer and learner else "explorer_only" if num_explorer else "learner_only"
        counts[f"filtered_{mix}"] += 1
    _add(stats, {f"dynamic/{k}": v for k, v in counts.items()})
    return informative


def _discarded_tokens(generated: list[Group], trained: list[Group]) -> dict[str, float]:
    """Per source: prompt + response tokens of the generated samples the step does not train on."""
    kept = {id(r) for g in trained for r in g.rollouts}
    out = {source.value: 0.0 for source in Source}
    for group in generated:
        for r in group.rollouts:
            if id(r) not in kept:
                out[r.source.value] += len(r.prompt_ids) + len(r.response_ids)
    return out


def _add(total: dict[str, float], more: dict[str, float]) -> None:
    for key, value in more.items():
        total[key] = total.get(key, 0.0) + value
