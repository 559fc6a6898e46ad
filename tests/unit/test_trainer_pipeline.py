"""The rollout pipeline (megatron_s2lpo/trainer/pipeline.py) in one process: which weights each
step's rollouts are generated with, what overlaps what, errors, checkpoints of the step ahead.

The collecting stage is the real `RolloutStage` over the real `GroupCollector` and `LocalEngine`
(a tiny random Qwen3 model) and a scorer that rewards every completion by its length; the weight
sync is a counter that sets the engine's version, as the real one does after a push."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from megatron_s2lpo.config import ModelArch, SamplingConfig, load_config
from megatron_s2lpo.config.algo import DynamicSamplingConfig
from megatron_s2lpo.data import PromptSampler, build_synthetic_tokenizer, make_arithmetic_prompts, tokenize_prompts
from megatron_s2lpo.rollout import GroupCollector, LocalEngine
from megatron_s2lpo.rollout.validation import AnswerRules
from megatron_s2lpo.trainer.metrics import importance_metrics, staleness_metrics
from megatron_s2lpo.trainer.pipeline import (PENDING_FILE, RolloutPipeline, RolloutStage, ScoringEngine,
                                             decode_groups, encode_groups)
from megatron_s2lpo.types import SOURCE_CODES, Source

NUM_STEPS = 4


class LengthScorer:
    """Rewards = completion length in characters (deterministic; the math scorer's submit API)."""

    def submit(self, texts: list[str], truths: list[str]) -> Future:
        future: Future = Future()
        future.set_result([float(len(t)) for t in texts])
        return future


@dataclass
class CountingSync:
    """Pushes set the engine's weight version; records what was being generated at each push."""

    engine: LocalEngine
    log: list = field(default_factory=list)
    version: int = 0

    def sync(self, version: int) -> str:
        self.log.append(("push", version, self.engine._lock._is_owned(), time.perf_counter()))  # noqa: SLF001
        with self.engine._lock:  # noqa: SLF001 - as LocalEngine._load: between generate calls
            self.engine._version = version  # noqa: SLF001
        self.version = version
        return "synced"


class RecordingEngine(LocalEngine):
    """The local engine, recording when each generate call began and with which weights."""

    calls: list
    called: threading.Condition

    def generate(self, requests):
        with self.called:
            self.calls.append((time.perf_counter(), self.weight_version))
            self.called.notify_all()
        return super().generate(requests)

    def wait_for_calls(self, num: int, timeout_s: float = 60.0) -> bool:
        with self.called:
            return self.called.wait_for(lambda: len(self.calls) >= num, timeout=timeout_s)


class Groups:
    rank = 0
    world_size = 1


def make_pipeline(max_staleness: int, *, num_steps: int = NUM_STEPS, dynamic: DynamicSamplingConfig | None = None):
    tokenizer = build_synthetic_tokenizer()
    cfg = load_config(None, ["data.synthetic.num_train=12"])
    prompts = tokenize_prompts(make_arithmetic_prompts(cfg.data.synthetic, split="train", num_prompts=12), tokenizer)
    arch = ModelArch(family="qwen3", vocab_size=101, hidden_size=32, ffn_hidden_size=64, num_layers=1,
                     num_attention_heads=2, num_query_groups=1, head_dim=16, max_position_embeddings=128)
    base = LocalEngine.from_arch(arch, init_seed=3, tokenizer=tokenizer)
    engine = RecordingEngine(base.model, tokenizer=tokenizer, seed=0)
    engine.calls, engine.called = [], threading.Condition()
    stage = RolloutStage(None, LengthScorer())
    stage.collector = GroupCollector(learner=ScoringEngine(engine, stage),
                                     sampling=SamplingConfig(temperature=1.0, max_new_tokens=6), group_size=2,
                                     t_mix=0, seed=5, rules=AnswerRules(vocab_size=101, max_staleness=max_staleness))
    sync = CountingSync(engine)
    pipeline = RolloutPipeline(stage=stage, sampler=PromptSampler(len(prompts), 3, seed=1), prompts=prompts,
                               groups=Groups(), sync=sync, max_staleness=max_staleness, num_steps=num_steps,
                               prefetch_steps=0, temperature=lambda step: 1.0, dynamic=dynamic)
    return pipeline, engine, sync, prompts


def run_steps(pipeline: RolloutPipeline, first: int = 1, last: int = NUM_STEPS, train=None) -> list:
    out = []
    for step in range(first, last + 1):
        groups = pipeline.next_batch(step)
        if train is not None:  # the learner's log-probs and updates
            train(step)
        pipeline.push_weights(step)
        out.append((step, groups, pipeline.step_metrics()))
    return out


def versions(groups) -> set[int]:
    return {r.weight_version for g in groups for r in g.rollouts}


@pytest.mark.parametrize("max_staleness", [0, 1])
def test_rollouts_are_generated_one_version_behind_only_when_ahead(max_staleness: int) -> None:
    pipeline, engine, sync, _ = make_pipeline(max_staleness)
    try:
        steps = run_steps(pipeline)
    finally:
        pipeline.close()
    for step, groups, metrics in steps:
        on_policy = step - 1
        want = max(0, on_policy - max_staleness)  # step 1 has nothing older than version 0
        assert versions(groups) == {want}, step
        assert staleness_metrics(groups, step) == {"staleness/mean": float(on_policy - want),
                                                   "staleness/max": float(on_policy - want)}
        assert {"time/rollout", "time/reward", "time/wait_rollout", "time/wait_train", "time/sync",
                "time/overlap"} <= set(metrics)
    assert [entry[:2] for entry in sync.log] == [("push", s) for s in range(1, NUM_STEPS + 1)]
    assert not any(owned for _, _, owned, _ in sync.log)  # no push landed inside a generate call
    assert len(engine.calls) == NUM_STEPS  # nothing is collected past the last step
    for step in range(1, NUM_STEPS):  # step+1's generation began before (ahead) or after version step's push
        began, pushed = engine.calls[step][0], sync.log[step - 1][3]
        assert (began < pushed) == bool(max_staleness), step


def test_generation_runs_while_the_learner_trains() -> None:
    """Ahead, step i+1's generation begins while step i trains: a learner that will not finish
    training before it has begun completes every step. On-policy nothing generates during
    training, and the learner waits for each whole collection."""
    pipeline, engine, _, _ = make_pipeline(1)

    def train_ahead(step: int) -> None:
        if step < NUM_STEPS:  # calls of steps 1 .. step+1
            assert engine.wait_for_calls(step + 1), f"step {step + 1} did not start generating while {step} trained"
            time.sleep(0.05)  # training goes on after that generation began

    try:
        ahead = run_steps(pipeline, train=train_ahead)
    finally:
        pipeline.close()
    for step, _, metrics in ahead[1:]:
        assert metrics["time/overlap"] > 0, (step, metrics)  # part of its collection ran behind training

    pipeline, engine, _, _ = make_pipeline(0)

    def train_on_policy(step: int) -> None:
        assert len(engine.calls) == step, step  # step+1 is not generating

    try:
        on_policy = run_steps(pipeline, train=train_on_policy)
    finally:
        pipeline.close()
    for step, _, metrics in on_policy:
        assert metrics["time/overlap"] == 0.0, (step, metrics)
        assert metrics["time/wait_rollout"] >= metrics["time/rollout"] + metrics["time/reward"], (step, metrics)


def test_a_failed_collection_ahead_reaches_the_push_of_the_step() -> None:
    pipeline, engine, sync, _ = make_pipeline(1)
    real = engine.generate

    def broken(requests):
        if len(engine.calls) >= 1:
            raise RuntimeError("server went away")
        return real(requests)

    engine.generate = broken
    try:
        pipeline.next_batch(1)  # step 2 is collected now and fails
        with pytest.raises(RuntimeError, match="server went away"):
            pipeline.push_weights(1)
        assert sync.log == []  # no push after a failed collection: nothing is checkpointed
    finally:
        pipeline.close()


def test_checkpoint_holds_the_step_ahead_and_a_resume_trains_on_it(tmp_path: Path) -> None:
    pipeline, _, _, prompts = make_pipeline(1)
    try:
        run_steps(pipeline, 1, 2)
        files = pipeline.checkpoint_files()
        expected = pipeline.next_batch(3)
    finally:
        pipeline.close()
    assert list(files) == [PENDING_FILE]
    (tmp_path / PENDING_FILE).write_bytes(files[PENDING_FILE])
    resumed, _, _, _ = make_pipeline(1)
    try:
        resumed.sampler.next_batch(), resumed.sampler.next_batch(), resumed.sampler.next_batch()  # as saved
        resumed.resume(tmp_path, 2)
        got = resumed.next_batch(3)
    finally:
        resumed.close()
    assert got == expected  # the same prompts, tokens, log-probs, rewards and versions
    refused, _, _, _ = make_pipeline(0)
    with pytest.raises(ValueError, match="run.max_staleness=1"):
        refused.resume(tmp_path, 2)
    refused.close()


def test_pending_file_round_trip_is_exact_and_damage_is_named(tmp_path: Path) -> None:
    pipeline, _, _, prompts = make_pipeline(0)
    try:
        groups = pipeline.next_batch(1)
    finally:
        pipeline.close()
    groups[0].rollouts[0].response_logprobs[0] = -0.1234567890123456789  # float64 survives
    data = encode_groups(2, groups, 1.5, 0.25)
    step, decoded, rollout_s, reward_s = decode_groups(data, {p.prompt_id: p for p in prompts}, where="f")
    assert (step, decoded, rollout_s, reward_s) == (2, groups, 1.5, 0.25)
    with pytest.raises(ValueError, match="f is damaged"):
        decode_groups(data[:-40], {p.prompt_id: p for p in prompts}, where="f")
    with pytest.raises(ValueError, match="does not have"):
        decode_groups(data, {}, where="f")


def test_importance_metrics_over_the_weighted_rows() -> None:
    import torch

    from megatron_s2lpo.types import TrainBatch

    behaviour = torch.zeros(2, 3)
    old = torch.tensor([[0.0, 1.0, 0.5], [3.0, 3.0, 3.0]])  # row 1 is the explorer's: not weighted
    batch = TrainBatch(tokens=torch.zeros(2, 3, dtype=torch.long), loss_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]),
                       advantages=torch.zeros(2, 3), old_logprobs=old, behaviour_logprobs=behaviour,
                       sources=torch.tensor([SOURCE_CODES[Source.LEARNER], SOURCE_CODES[Source.EXPLORER]]),
                       seq_lens=torch.tensor([3, 3]))
    out = importance_metrics(batch, 2.0, (SOURCE_CODES[Source.LEARNER],))
    assert out["train/is_clipped_frac"] == pytest.approx(0.5)  # e^1 > 2 is capped, e^0.5 is not
    assert out["train/is_weight_mean"] == pytest.approx((2.0 + 2.718281828 ** 0.5) / 2)
    assert importance_metrics(batch, None, None) == {}


@pytest.mark.parametrize("overrides, match", [
    (["run.max_staleness=2"], "not supported"),
    (["run.max_staleness=1", "algo.is_threshold=null"], "importance weight"),
    (["run.max_staleness=1", "algo.is_threshold=null", "algo.old_logprob=behaviour"], "old_logprob=behaviour"),
    (["run.max_staleness=1", "sync.transport=tensor", "rollout.learner.backend=sglang",
      "rollout.learner.url=http://127.0.0.1:1"], "GPUs of its own"),
])
def test_pipeline_options_that_cannot_work_are_refused(overrides: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_config(None, overrides)


def test_every_stage_of_a_staged_recipe_runs_its_own_pipeline() -> None:
    """Each stage is a run of its own: its pipeline collects nothing past the stage's last step
    (test_rollouts_are_generated_one_version_behind_only_when_ahead), so no stage trains on
    rollouts of the model before it."""
    from megatron_s2lpo.config import stage_run_config

    cfg = load_config(str(Path(__file__).resolve().parents[2] / "examples" / "tiny_bridge_cpu.yaml"),
                      ["run.max_staleness=1"])
    assert [stage_run_config(cfg, i).run.max_staleness for i in range(len(cfg.stages))] == [1] * len(cfg.stages)


# ----------------------------------------------------------------------------- dynamic sampling


DYNAMIC = DynamicSamplingConfig(enabled=True, metric="reward", max_rounds=3)


def without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith("time/")}


@pytest.mark.parametrize("max_staleness", [0, 1])
def test_dynamic_sampling_rounds_resume_from_the_sampler_state(max_staleness: int, tmp_path: Path) -> None:
    """The rounds draw their prompts from the run's sampler: a pipeline restored from the state a
    checkpoint of step 2 saves (the sampler, and one step ahead step 3's groups with their
    dynamic-sampling metrics) collects steps 3 and 4 exactly as the uninterrupted one did."""
    from megatron_s2lpo.trainer.pipeline import PENDING_STATS_FILE

    pipeline, _, _, _ = make_pipeline(max_staleness, dynamic=DYNAMIC)
    try:
        first = run_steps(pipeline, 1, 2)
        files, state = pipeline.checkpoint_files(), pipeline.sampler.state_dict()
        expected = run_steps(pipeline, 3, 4)
    finally:
        pipeline.close()
    rounds = [m["dynamic/rounds"] for _, _, m in first + expected]
    assert max(rounds) > 1 and any(m["dynamic/cap_hit"] for _, _, m in first + expected)  # over-sampled, capped
    assert pipeline.sampler.epoch * 4 + pipeline.sampler.position // 3 == sum(rounds)  # a batch per round
    assert sorted(files) == ([PENDING_FILE, PENDING_STATS_FILE] if max_staleness else [])
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    resumed, _, sync, _ = make_pipeline(max_staleness, dynamic=DYNAMIC)
    try:
        sync.sync(2)  # the checkpoint's weights, as trainer.loop.resume pushes them
        resumed.sampler.load_state_dict(state)
        resumed.resume(tmp_path, 2)
        got = run_steps(resumed, 3, 4)
    finally:
        resumed.close()
    for (step, groups, metrics), (_, want_groups, want_metrics) in zip(got, expected, strict=True):
        assert groups == want_groups, step
        assert without_timing(metrics) == without_timing(want_metrics), step
    if max_staleness:  # a damaged metrics file of the step ahead is refused, naming it
        (tmp_path / PENDING_STATS_FILE).write_text('{"step": 3, "metrics": [1]}')
        damaged, _, _, _ = make_pipeline(max_staleness, dynamic=DYNAMIC)
        with pytest.raises(ValueError, match=f"{PENDING_STATS_FILE} is damaged"):
            damaged.resume(tmp_path, 2)
        damaged.close()


def test_over_sampled_explorer_samples_come_from_the_store_then_the_explorer(tmp_path: Path) -> None:
    """Every round's explorer share goes through the prefetcher: stored samples while the store has
    them, the live explorer for the rest, each sample of the step with its own seed; everything
    generated and not trained on is counted."""
    from megatron_s2lpo.rollout import ExplorerPrefetcher, StoreReader, fill_store
    from megatron_s2lpo.trainer.dynamic_sampling import collect_step

    class Constant(LengthScorer):
        def submit(self, texts, truths):
            future: Future = Future()
            future.set_result([1.0] * len(texts))  # every group uniform: every round runs
            return future

    pipeline, engine, _, prompts = make_pipeline(0)
    pipeline.close()
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=4)
    fill_store(engine, prompts[:4], 2, sampling, str(tmp_path), seed=3)  # 2 stored samples of 4 prompts
    requests = []
    live = RecordingEngine(engine.model, tokenizer=engine.tokenizer, seed=1)
    live.calls, live.called = [], threading.Condition()
    real = live.generate
    live.generate = lambda batch: requests.extend(r.request_id for r in batch) or real(batch)
    prefetcher = ExplorerPrefetcher(reader=StoreReader(str(tmp_path)), engine=live, sampling=sampling, seed=4)
    stage = RolloutStage(None, Constant())
    stage.collector = GroupCollector(learner=ScoringEngine(engine, stage), sampling=sampling, group_size=4, t_mix=3,
                                     prefetcher=prefetcher, seed=5)  # step 2: 2 explorer + 2 learner samples
    batches = iter([prompts[3:6], prompts[6:9]])
    try:
        got = collect_step(stage, 2, prompts[:3], lambda: next(batches), 1.0, (), DYNAMIC)
    finally:
        stage.collector.close()
        prefetcher.close()
    assert got.metrics["dynamic/rounds"] == 3 and got.metrics["dynamic/filtered_mixed"] == 9
    assert [g.prompt.prompt_id for g in got.groups] == [p.prompt_id for p in prompts[:3]]  # no informative group
    assert prefetcher.num_from_store == 4 * 2 and prefetcher.num_live == 5 * 2
    # the live explorer served prompts 4..8 of the step (k over all rounds), two samples each
    assert sorted(requests) == sorted(f"explorer/s2/{k}/{prompts[k].prompt_id}/{j}" for k in range(4, 9)
                                      for j in range(2))
    generated = 9 * 4 * (len(prompts[0].token_ids) + 4)  # at most 4 response tokens each
    assert 0 < got.discarded_tokens["explorer"] and 0 < got.discarded_tokens["learner"]
    assert got.discarded_tokens["explorer"] + got.discarded_tokens["learner"] <= generated * 2 / 3
