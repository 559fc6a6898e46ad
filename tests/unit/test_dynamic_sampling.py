"""DAPO's dynamic sampling (algo/group_filter.py, trainer/dynamic_sampling.py) against verl's, and
the overlong reward shaping (reward/overlong.py) on its own.

verl's dynamic sampling lives inside `RayDAPOTrainer.fit` (recipe/dapo/dapo_ray_trainer.py), which
needs Ray workers and a DataProto batch to run; `verl_dapo_rounds` below is that branch ported
verbatim from verl commit 246cac4ca6b0e3ce1009bc48aaa798689e0600af (the last commit before the
recipe moved to the verl-recipe repository), with DataProto replaced by a list of trajectories
(uid, metric value) and the generation by the next scripted batch. The overlong penalty is checked
against verl's own DAPORewardManager in tests/contract/test_verl_dapo.py.
"""

from __future__ import annotations

import random
from collections import defaultdict

import numpy as np
import pytest
import torch

from megatron_s2lpo.algo.advantages import group_advantages
from megatron_s2lpo.algo.batch import build_train_batch, trainable_mini_batches
from megatron_s2lpo.algo.group_filter import fill_batch, filter_values, informative_groups
from megatron_s2lpo.config import load_config
from megatron_s2lpo.config.algo import DynamicSamplingConfig
from megatron_s2lpo.config.reward import OverlongConfig
from megatron_s2lpo.reward.overlong import OverlongShaping, overlong_metrics, overlong_penalty
from megatron_s2lpo.trainer.dynamic_sampling import ScoredRound, collect_step
from megatron_s2lpo.types import FinishReason, Group, Prompt, Rollout, Source

pytestmark = pytest.mark.timeout(60)

# our metric name -> the name verl's recipe gives the same per-trajectory value
VERL_METRIC = {"accuracy": "acc", "score": "seq_reward", "reward": "seq_final_reward"}


def verl_dapo_rounds(gen_batches, metric_name: str, prompt_bsz: int, n: int, max_num_gen_batches: int):
    """recipe/dapo/dapo_ray_trainer.py @ 246cac4, RayDAPOTrainer.fit, `filter_groups` branch.

    gen_batches: one list per generation batch of trajectory dicts {"uid", metric_name}; returns
    (the trajectories trained on, num_gen_batches). The statements are verl's, in verl's order."""
    batch = None
    num_prompt_in_batch = 0
    num_gen_batches = 0
    for new_batch in gen_batches:
        num_gen_batches += 1
        # Collect the sequence reward for each trajectory
        prompt_uid2metric_vals = defaultdict(list)
        for uid, metric_val in zip([t["uid"] for t in new_batch], [t[metric_name] for t in new_batch], strict=True):
            prompt_uid2metric_vals[uid].append(metric_val)

        prompt_uid2metric_std = {}
        for prompt_uid, metric_vals in prompt_uid2metric_vals.items():
            prompt_uid2metric_std[prompt_uid] = np.std(metric_vals)

        kept_prompt_uids = [
            uid
            for uid, std in prompt_uid2metric_std.items()
            if std > 0 or len(prompt_uid2metric_vals[uid]) == 1
        ]
        num_prompt_in_batch += len(kept_prompt_uids)

        kept_traj_idxs = []
        for idx, traj_from_prompt_uid in enumerate([t["uid"] for t in new_batch]):
            if traj_from_prompt_uid in kept_prompt_uids:
                kept_traj_idxs.append(idx)

        new_batch = [new_batch[i] for i in kept_traj_idxs]
        batch = new_batch if batch is None else batch + new_batch

        if num_prompt_in_batch < prompt_bsz:
            if max_num_gen_batches <= 0 or num_gen_batches < max_num_gen_batches:
                continue
            else:
                raise ValueError(
                    f"{num_gen_batches=} >= {max_num_gen_batches=}."
                    + " Generated too many. Please check if your data are too difficult."
                    + " You could also try set max_num_gen_batches=0 to enable endless trials."
                )
        else:
            # Align the batch
            traj_bsz = prompt_bsz * n
            batch = batch[:traj_bsz]
            return batch, num_gen_batches
    raise AssertionError("the scripted generation batches ran out")


class ScriptedStage:
    """The rollout stage's interface (pipeline.RolloutStage.collect) over scripted outcomes: each
    prompt's samples get `script[prompt_id]` = [(source, score, reward, response length)]."""

    def __init__(self, script: dict[str, list[tuple[Source, float, float, int]]]) -> None:
        self.script = script
        self.calls: list[tuple[int, list[str], int]] = []

    def collect(self, step, prompts, upcoming, temperature, *, first_index=0) -> ScoredRound:
        self.calls.append((step, [p.prompt_id for p in prompts], first_index))
        groups, scores = [], []
        for prompt in prompts:
            samples = self.script[prompt.prompt_id]
            rollouts = [Rollout(prompt_id=prompt.prompt_id, sample_index=j, source=source, prompt_ids=[1, 2],
                                response_ids=[3] * length, response_logprobs=[-1.0] * length,
                                finish_reason=FinishReason.STOP, weight_version=0, reward=reward)
                        for j, (source, _, reward, length) in enumerate(samples)]
            groups.append(Group(prompt=prompt, rollouts=rollouts))
            scores.append([score for _, score, _, _ in samples])
        return ScoredRound(groups=groups, scores=scores, rollout_s=0.5, reward_s=0.25)


def random_script(rng: random.Random, num_prompts: int, group_size: int, num_explorer: int):
    """Scores 0/1 (each prompt with its own solve rate, so many groups are uniform) and rewards
    shaped by an overlong buffer of 4 tokens: dyadic values, whose means are exact in float64."""
    script = {}
    for i in range(num_prompts):
        rate = rng.choice([0.0, 0.0, 0.1, 0.5, 0.9, 1.0, 1.0])
        samples = []
        for j in range(group_size):
            score = float(rng.random() < rate)
            length = rng.choice([4, 8, 10, 12, 13, 14, 16])
            reward = score + overlong_penalty(length, max_tokens=16, buffer_tokens=4, penalty_factor=1.0)
            samples.append((Source.EXPLORER if j < num_explorer else Source.LEARNER, score, reward, length))
        script[f"q{i}"] = samples
    return script


def trajectories(script, prompt_ids, metric: str):
    out = []
    for pid in prompt_ids:
        for source, score, reward, _ in script[pid]:
            value = {"accuracy": bool(score >= 1), "score": score, "reward": reward}[metric]
            out.append({"uid": pid, VERL_METRIC[metric]: value, "id": (pid, len([t for t in out if t["uid"] == pid]))})
    return out


def sampler_batches(num_prompts: int, batch_size: int):
    order = [Prompt(prompt_id=f"q{i}", text="", ground_truth="", token_ids=[1, 2]) for i in range(num_prompts)]
    batches = [order[k:k + batch_size] for k in range(0, num_prompts, batch_size)]
    return batches


@pytest.mark.parametrize("metric", ["accuracy", "score", "reward"])
@pytest.mark.parametrize("seed", range(6))
def test_rounds_keep_the_groups_verls_dynamic_sampling_keeps(metric: str, seed: int) -> None:
    """Same scripted generations, same metric: the same trajectories trained on, in the same
    order, after the same number of generation rounds (oversample 1 and 2)."""
    rng = random.Random(seed)
    group_size, target = rng.choice([(4, 3), (8, 4), (5, 2)])
    oversample = 1 + seed % 2
    num_prompts = 60 * target
    script = random_script(rng, num_prompts, group_size, num_explorer=rng.choice([0, 1, group_size // 2]))
    batches = sampler_batches(num_prompts, target)
    rounds = [sum(batches[r * oversample:(r + 1) * oversample], []) for r in range(len(batches) // oversample)]
    expected, num_rounds = verl_dapo_rounds([trajectories(script, [p.prompt_id for p in r], metric) for r in rounds],
                                            VERL_METRIC[metric], target, group_size, max_num_gen_batches=0)
    stage, pending = ScriptedStage(script), iter(batches[1:])
    cfg = DynamicSamplingConfig(enabled=True, metric=metric, max_rounds=len(rounds), oversample=oversample)
    got = collect_step(stage, 3, batches[0], lambda: next(pending), 1.0, (), cfg)
    assert [(r.prompt_id, r.sample_index) for g in got.groups for r in g.rollouts] == [t["id"] for t in expected]
    assert got.metrics["dynamic/rounds"] == num_rounds
    assert [first for _, _, first in stage.calls] == [k * oversample * target for k in range(num_rounds)]
    assert got.metrics["dynamic/cap_hit"] == 0.0 and got.metrics["dynamic/groups_trained"] == target


def test_the_round_cap_trains_on_what_there_is_where_verl_raises() -> None:
    solved, mixed = [(Source.LEARNER, 1.0, 1.0, 3)] * 4, [(Source.LEARNER, s, s, 3) for s in (1.0, 0.0, 0.0, 0.0)]
    script = {"q0": solved, "q1": mixed, "q2": solved, "q3": solved, "q4": solved, "q5": solved}
    batches = sampler_batches(6, 2)
    cfg = DynamicSamplingConfig(enabled=True, metric="accuracy", max_rounds=3)
    with pytest.raises(ValueError, match="Generated too many"):
        verl_dapo_rounds([trajectories(script, [p.prompt_id for p in b], "accuracy") for b in batches],
                         "acc", 2, 4, max_num_gen_batches=3)
    pending = iter(batches[1:])
    got = collect_step(ScriptedStage(script), 1, batches[0], lambda: next(pending), 1.0, (), cfg)
    assert [g.prompt.prompt_id for g in got.groups] == ["q1"]
    assert got.metrics["dynamic/cap_hit"] == 1.0 and got.metrics["dynamic/rounds"] == 3
    # nothing informative at all: the first round's groups, zero advantage everywhere
    pending = iter(batches[1:])
    script["q1"] = solved
    got = collect_step(ScriptedStage(script), 1, batches[0], lambda: next(pending), 1.0, (), cfg)
    assert [g.prompt.prompt_id for g in got.groups] == ["q0", "q1"]
    assert got.metrics["dynamic/groups_informative"] == 0.0 and got.metrics["dynamic/groups_trained"] == 2.0
    # what was generated and not trained on is counted (4 rollouts of 2 + 3 tokens per group)
    assert got.discarded_tokens == {"learner": 4 * 4 * 5.0, "explorer": 0.0}
    assert got.metrics["dynamic/extra_tokens/learner"] == 80.0


def test_uniform_values_that_numpy_std_calls_nonzero_are_filtered_here() -> None:
    """verl keeps a group when np.std > 0: three rewards of 0.7 have np.std 1e-16, so verl keeps
    it though every advantage is zero; max == min drops it (our advantages are exactly 0)."""
    rewards = torch.tensor([[0.7, 0.7, 0.7], [0.1, 0.1, 0.1], [1.0, 0.0, 1.0]], dtype=torch.float64)
    assert [bool(np.std(row.tolist()) > 0) for row in rewards] == [True, True, True]
    assert informative_groups(rewards).tolist() == [False, False, True]
    assert group_advantages(rewards)[:2].abs().max() == 0.0


def test_filter_metrics_and_batch_filling() -> None:
    scores = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    rewards = torch.tensor([[0.75, 1.0], [0.0, 1.0], [-0.5, 0.0]])  # overlong-shaped
    assert informative_groups(filter_values("reward", rewards, scores)).tolist() == [True, True, True]
    assert informative_groups(filter_values("score", rewards, scores)).tolist() == [False, True, False]
    assert informative_groups(filter_values("accuracy", rewards, scores)).tolist() == [False, True, False]
    with pytest.raises(ValueError, match="unknown dynamic-sampling metric 'acc'"):
        filter_values("acc", rewards, scores)
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        informative_groups(torch.zeros(3, 1))
    assert fill_batch(["a"], ["b", "c", "d"], [True, False, True], 2) == (["a", "b"], 1)
    assert fill_batch([], ["b", "c"], [False, True], 3) == (["c"], 0)


def test_round_metrics_count_filtered_groups_by_source_mix_and_outcome() -> None:
    e, s = Source.EXPLORER, Source.LEARNER
    script = {
        "q0": [(e, 1.0, 1.0, 3), (e, 1.0, 1.0, 3), (s, 1.0, 1.0, 3), (s, 1.0, 1.0, 3)],  # mixed, solved
        "q1": [(e, 1.0, 1.0, 3), (e, 0.0, 0.0, 3), (s, 0.0, 0.0, 3), (s, 0.0, 0.0, 3)],  # informative via explorer
        "q2": [(e, 0.0, 0.0, 3), (e, 0.0, 0.0, 3), (s, 0.0, 0.0, 3), (s, 0.0, 0.0, 3)],  # mixed, unsolved
        "q3": [(e, 0.0, 0.0, 3), (e, 1.0, 1.0, 3), (s, 1.0, 1.0, 3), (s, 0.0, 0.0, 3)],  # informative, both
    }
    batches = sampler_batches(4, 4)
    got = collect_step(ScriptedStage(script), 2, batches[0], lambda: [], 1.0, (),
                       DynamicSamplingConfig(enabled=True, max_rounds=1))
    m = got.metrics
    assert (m["dynamic/groups_generated"], m["dynamic/groups_informative"], m["dynamic/groups_filtered"]) == (4, 2, 2)
    assert (m["dynamic/filtered_solved"], m["dynamic/filtered_unsolved"], m["dynamic/filtered_mixed"]) == (1, 1, 2)
    assert m["dynamic/filtered_explorer_only"] == m["dynamic/filtered_learner_only"] == 0
    assert m["dynamic/informative_via_explorer"] == 1
    assert [g.prompt.prompt_id for g in got.groups] == ["q1", "q3"] and m["dynamic/cap_hit"] == 1.0
    off = collect_step(ScriptedStage(script), 2, batches[0], lambda: [], 1.0, (), DynamicSamplingConfig())
    assert len(off.groups) == 4 and off.metrics == {} and off.discarded_tokens == {}


def rollout(length: int, finish: FinishReason, reward: float) -> Rollout:
    return Rollout(prompt_id="p", sample_index=0, source=Source.LEARNER, prompt_ids=[1], response_ids=[5] * length,
                   response_logprobs=[-0.5] * length, finish_reason=finish, weight_version=0, reward=reward)


def test_overlong_penalty_and_masking() -> None:
    # verl's formula by hand: max 20, buffer 4 -> free up to 16 tokens, -factor at 20, beyond it further down
    penalties = [overlong_penalty(n, max_tokens=20, buffer_tokens=4, penalty_factor=0.5) for n in (1, 16, 17, 20, 22)]
    assert penalties == [0.0, 0.0, -0.125, -0.5, -0.75]
    assert overlong_penalty(20, max_tokens=20, buffer_tokens=0, penalty_factor=1.0) == 0.0
    shaping = OverlongShaping(OverlongConfig(buffer_tokens=4, penalty_factor=1.0, mask_truncated=True), 20)
    rollouts = [rollout(10, FinishReason.STOP, 1.0), rollout(18, FinishReason.STOP, 1.0),
                rollout(20, FinishReason.LENGTH, 0.0)]
    counts = shaping.apply(rollouts)
    assert [r.reward for r in rollouts] == [1.0, 0.5, -1.0]
    assert [sum(r.loss_mask) for r in rollouts] == [10, 18, 0]  # the truncated one is out of the loss
    assert overlong_metrics(counts) == {"overlong/truncated_frac": 1 / 3, "overlong/penalized_frac": 2 / 3,
                                        "overlong/penalty_mean": -0.5}
    unmasked = OverlongShaping(OverlongConfig(buffer_tokens=4), 20)
    kept = rollout(20, FinishReason.LENGTH, 0.0)
    unmasked.apply([kept])
    assert sum(kept.loss_mask) == 20
    with pytest.raises(ValueError, match="has no reward to shape"):
        unmasked.apply([rollout(3, FinishReason.STOP, None)])


def test_mini_batches_without_loss_tokens_are_skipped() -> None:
    groups = [Group(prompt=Prompt(prompt_id="p", text="", ground_truth=""),
                    rollouts=[rollout(3, FinishReason.LENGTH, 0.0) for _ in range(4)])]
    for r in groups[0].rollouts[:2]:
        r.loss_mask = [0, 0, 0]
    batch = build_train_batch(groups, torch.zeros(4))
    assert trainable_mini_batches(batch, 2) == [[2, 3]]
    assert trainable_mini_batches(batch, 1) == [[0, 1, 2, 3]]


def test_config_refuses_what_dynamic_sampling_and_overlong_cannot_do() -> None:
    on = ["algo.dynamic_sampling.enabled=true"]
    assert load_config(None, on).algo.dynamic_sampling.metric == "accuracy"
    with pytest.raises(ValueError, match="algo.dynamic_sampling.metric must be one of"):
        load_config(None, [*on, "algo.dynamic_sampling.metric=acc"])
    with pytest.raises(ValueError, match="max_rounds must be >= 1"):
        load_config(None, [*on, "algo.dynamic_sampling.max_rounds=0"])
    with pytest.raises(ValueError, match="algo.group_size .* >= 2"):
        load_config(None, [*on, "algo.group_size=1"])
    with pytest.raises(ValueError, match="algo.method=opd does not train on"):
        load_config(None, [*on, "algo.method=opd", "rollout.teacher.url=http://127.0.0.1:1"])
    cfg = load_config(None, ["reward.overlong.buffer_tokens=256", "rollout.learner.sampling.max_new_tokens=1024"])
    assert cfg.overlong_max_tokens() == 1024 and cfg.reward.overlong.enabled
    with pytest.raises(ValueError, match="reward.overlong.buffer_tokens=2048 is longer than the response limit"):
        load_config(None, ["reward.overlong.buffer_tokens=2048", "rollout.learner.sampling.max_new_tokens=1024"])
    assert load_config(None, ["reward.overlong.buffer_tokens=2048", "reward.overlong.max_response_tokens=4096"])


def test_the_dapo_recipe_is_the_paper_recipe_with_dapos_settings() -> None:
    import os

    examples = os.path.join(os.path.dirname(__file__), "..", "..", "examples")

    def flat(data: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in data.items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
        return out

    base = flat(load_config(os.path.join(examples, "qwen3_8b_explorer_1p7b.yaml")).to_dict())
    dapo_cfg = load_config(os.path.join(examples, "qwen3_8b_explorer_1p7b_dapo.yaml"))
    dapo = flat(dapo_cfg.to_dict())
    differ = {key for key in base if base[key] != dapo[key]}
    assert differ == {"run.name", "run.output_dir", "algo.clip_high", "algo.clip_ratio_c", "algo.kl_coef",
                      "algo.dynamic_sampling.enabled", "algo.dynamic_sampling.oversample",
                      "reward.overlong.buffer_tokens"}
    assert (dapo_cfg.algo.clip_low, dapo_cfg.algo.clip_high, dapo_cfg.algo.loss_agg_mode) == (0.2, 0.28, "token-mean")
    assert dapo_cfg.algo.dynamic_sampling.metric == "accuracy" and dapo_cfg.algo.dynamic_sampling.max_rounds == 10
    assert dapo_cfg.overlong_max_tokens() == 4096 and dapo_cfg.reward.overlong.penalty_factor == 1.0


def test_config_names_match_the_filter_registry() -> None:
    from megatron_s2lpo.algo import FILTER_METRICS as registry
    from megatron_s2lpo.config.algo import FILTER_METRICS as names

    assert set(names) == set(registry)
