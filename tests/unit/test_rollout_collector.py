"""GroupCollector: the S2L-PO split per step, sources, order, versions, concurrency."""

import random
import threading
import time

import pytest
import torch

from megatron_s2lpo.algo.schedule import split_group
from megatron_s2lpo.config.algo import AlgoConfig
from megatron_s2lpo.config.model import ModelArch
from megatron_s2lpo.config.rollout import RolloutConfig, SamplingConfig
from megatron_s2lpo.data.tokenizer import build_synthetic_tokenizer
from megatron_s2lpo.rollout import build_prefetcher
from megatron_s2lpo.rollout.collector import GroupCollector
from megatron_s2lpo.rollout.engine import Completion
from megatron_s2lpo.rollout.explorer import ExplorerPrefetcher
from megatron_s2lpo.rollout.local import LocalEngine
from megatron_s2lpo.rollout.store import StoreReader, StoreWriter
from megatron_s2lpo.types import FinishReason, Prompt, Source

pytestmark = pytest.mark.timeout(60)
SAMPLING = SamplingConfig(max_new_tokens=8)


class WindowEngine:
    """Records the time window of each generate call. When given a partner, it waits (up to
    10 s) inside generate for the partner's call to begin, so two engines driven concurrently
    always overlap and two driven one after the other never can."""

    def __init__(self, version: int, partner: "WindowEngine | None" = None, fail: bool = False):
        self.version = version
        self.partner = partner
        self.fail = fail
        self.started = threading.Event()
        self.windows: list[tuple[float, float]] = []
        self.requests = []

    def generate(self, requests):
        start = time.monotonic()
        self.started.set()
        if self.partner is not None:
            self.partner.started.wait(10)
        self.requests.append(list(requests))
        if self.fail:
            raise RuntimeError("engine down")
        out = []
        for req in requests:
            rng = random.Random(req.seed)
            tokens = [rng.randrange(4, 100) for _ in range(3)]
            out.append(Completion(request_id=req.request_id, prompt_ids=list(req.prompt_ids),
                                  token_ids=tokens, text="", logprobs=[-1.0] * 3,
                                  finish_reason=FinishReason.LENGTH, weight_version=self.version))
        self.windows.append((start, time.monotonic()))
        self.started.clear()
        return out


def prompts(num: int) -> list[Prompt]:
    return [Prompt(prompt_id=f"p{i}", text="", ground_truth="", token_ids=[20 + i, 21]) for i in range(num)]


def pair():
    explorer = WindowEngine(version=0)
    learner = WindowEngine(version=3, partner=explorer)
    explorer.partner = learner
    return explorer, learner


def test_groups_follow_split_group_at_every_step():
    explorer, learner = WindowEngine(0), WindowEngine(3)
    group_size, t_mix = 5, 4
    collector = GroupCollector(learner=learner, explorer=explorer, sampling=SAMPLING,
                               group_size=group_size, t_mix=t_mix, seed=9)
    batch = prompts(3)
    for step in range(1, t_mix + 3):
        num_explorer, num_learner = split_group(step, group_size, t_mix)
        groups = collector.collect(batch, step)
        assert [g.prompt.prompt_id for g in groups] == ["p0", "p1", "p2"]
        for group in groups:
            assert group.num_from(Source.EXPLORER) == num_explorer
            assert group.num_from(Source.LEARNER) == num_learner
            assert [r.sample_index for r in group.rollouts] == list(range(group_size))
            sources = [r.source for r in group.rollouts]
            assert sources == [Source.EXPLORER] * num_explorer + [Source.LEARNER] * num_learner
            assert all(r.prompt_id == group.prompt.prompt_id for r in group.rollouts)
            assert all(r.prompt_ids == group.prompt.token_ids for r in group.rollouts)
            assert [r.weight_version for r in group.rollouts] == [0] * num_explorer + [3] * num_learner
    assert collector.split(1) == (5, 0) and collector.split(t_mix) == (0, 5)
    collector.close()


def test_both_engines_run_concurrently():
    explorer, learner = pair()
    collector = GroupCollector(learner=learner, explorer=explorer, sampling=SAMPLING, group_size=4,
                               t_mix=3)
    collector.collect(prompts(2), step=2)  # (2, 2)
    (e_start, e_end), (l_start, l_end) = explorer.windows[0], learner.windows[0]
    assert e_start < l_end and l_start < e_end  # the two calls were in flight at the same time


def test_sequential_calls_would_not_overlap():
    # The check above can fail: the same engines called one after the other do not overlap.
    explorer, learner = WindowEngine(0), WindowEngine(3)
    explorer.generate([]), learner.generate([])
    (_, e_end), (l_start, _) = explorer.windows[0], learner.windows[0]
    assert not l_start < e_end


def test_released_rounding_and_seeds():
    explorer, learner = WindowEngine(0), WindowEngine(1)
    algo = AlgoConfig(group_size=16, t_mix=16, rounding="released")
    collector = GroupCollector.from_config(algo, learner=learner, explorer=explorer, sampling=SAMPLING,
                                           seed=2)
    (group,) = collector.collect(prompts(1), step=8)
    assert (group.num_from(Source.EXPLORER), group.num_from(Source.LEARNER)) == (9, 8)
    assert [r.sample_index for r in group.rollouts] == list(range(17))
    seeds = [r.seed for call in explorer.requests + learner.requests for r in call]
    assert len(set(seeds)) == 17
    (again,) = collector.collect(prompts(1), step=8)
    assert [r.response_ids for r in again.rollouts] == [r.response_ids for r in group.rollouts]


def test_explorer_samples_from_the_store_with_prefetch(tmp_path):
    with StoreWriter(str(tmp_path)) as writer:
        for prompt in prompts(2):
            for j in range(6):
                writer.add(prompt.prompt_id, Completion(
                    request_id="x", prompt_ids=prompt.token_ids, token_ids=[50 + j], text="",
                    logprobs=[-0.1], finish_reason=FinishReason.STOP, weight_version=0))
    prefetcher = ExplorerPrefetcher(reader=StoreReader(str(tmp_path)))
    learner = WindowEngine(4)
    collector = GroupCollector(learner=learner, prefetcher=prefetcher, sampling=SAMPLING,
                               group_size=4, t_mix=3)
    # Step 1: 4 explorer samples each from the store; step 2 (2 explorer + 2 learner) is
    # prefetched meanwhile, after step 1's takes.
    first = collector.collect(prompts(2), step=1, upcoming=[prompts(2)])
    assert prefetcher.pending_steps() == [2]
    second = collector.collect(prompts(2), step=2)
    assert [r.response_ids for r in first[0].rollouts] == [[50], [51], [52], [53]]
    assert [r.response_ids for r in second[0].rollouts[:2]] == [[54], [55]]
    assert [r.source for r in second[1].rollouts] == [Source.EXPLORER] * 2 + [Source.LEARNER] * 2
    assert [r.sample_index for r in second[1].rollouts] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="step 2 was already submitted; submit steps in increasing"):
        collector.prefetch(2, prompts(2))
    prefetcher.close()

    built = build_prefetcher(RolloutConfig(explorer_store=str(tmp_path), reuse_explorer_samples=True),
                             explorer=None)
    assert built.reader.reuse and built.engine is None
    assert build_prefetcher(RolloutConfig(), explorer=None) is None


def test_configuration_errors():
    learner = WindowEngine(0)
    collector = GroupCollector(learner=learner, sampling=SAMPLING, group_size=4, t_mix=2)
    with pytest.raises(ValueError, match="step 1 needs 4 explorer samples .* no explorer engine"):
        collector.collect(prompts(1), step=1)
    assert collector.collect(prompts(1), step=2)[0].num_from(Source.LEARNER) == 4
    untokenized = [Prompt(prompt_id="raw", text="1+1", ground_truth="2")]
    with pytest.raises(ValueError, match="prompt 'raw' has no token_ids"):
        collector.collect(untokenized, step=3)
    with pytest.raises(ValueError, match="unknown explorer schedule"):
        GroupCollector(learner=learner, sampling=SAMPLING, group_size=4, t_mix=2, schedule="nope")


def test_a_failing_engine_fails_the_step_after_both_finish():
    explorer, learner = pair()
    explorer.fail = True
    collector = GroupCollector(learner=learner, explorer=explorer, sampling=SAMPLING, group_size=2, t_mix=3)
    with pytest.raises(RuntimeError, match="engine down"):
        collector.collect(prompts(1), step=2)
    assert len(learner.windows) == 1  # the learner's call had completed


def test_with_two_local_engines(one_thread):
    tok = build_synthetic_tokenizer()
    arch = ModelArch(family="qwen3", vocab_size=len(tok), hidden_size=32, ffn_hidden_size=64, num_layers=2,
                     num_attention_heads=4, num_query_groups=2, head_dim=8, qk_layernorm=True)
    explorer = LocalEngine.from_arch(arch, tokenizer=tok, init_seed=1)
    learner = LocalEngine.from_arch(arch, tokenizer=tok, init_seed=2, weight_version=6)
    batch = [Prompt(prompt_id=f"q{i}", text=t, ground_truth="", token_ids=tok.encode(t))
             for i, t in enumerate(["1+1=", "2*3="])]
    collector = GroupCollector(learner=learner, explorer=explorer, sampling=SAMPLING, group_size=4, t_mix=3)
    groups = collector.collect(batch, step=2)
    for group in groups:
        assert [(r.source, r.weight_version) for r in group.rollouts] == \
            [(Source.EXPLORER, 0)] * 2 + [(Source.LEARNER, 6)] * 2
        assert all(0 < len(r.response_ids) == len(r.response_logprobs) <= 8 for r in group.rollouts)
    collector.close()


class BadAnswerEngine(WindowEngine):
    """Answers like WindowEngine, then corrupts the first completion's `field` with `value`."""

    def __init__(self, version: int, field: str, value) -> None:
        super().__init__(version)
        self.field, self.value = field, value

    def generate(self, requests):
        out = super().generate(requests)
        if self.field == "token_ids":
            out[0].token_ids[1] = self.value
        elif self.field == "logprobs":
            out[0].logprobs[2] = self.value
        return out


@pytest.mark.parametrize("field, value, message", [
    ("token_ids", 300, r"learner engine answer for prompt 'p0' \(sample 0\): token id 300 at position 1 is outside "
                       r"the learner's vocabulary \[0, 128\)"),
    ("token_ids", -1, "token id -1 at position 1 is outside"),
    ("logprobs", float("nan"), "log-prob nan at position 2 .* is not finite"),
    ("logprobs", float("-inf"), "log-prob -inf at position 2"),
])
def test_an_answer_the_learner_cannot_train_on_is_refused(field, value, message):
    from megatron_s2lpo.rollout.validation import AnswerRules, InvalidAnswerError

    collector = GroupCollector(learner=BadAnswerEngine(1, field, value), sampling=SAMPLING, group_size=2, t_mix=0,
                               rules=AnswerRules(vocab_size=128))
    with pytest.raises(InvalidAnswerError, match=message):
        collector.collect(prompts(2), step=2)
    collector.close()


def test_the_learners_samples_must_carry_the_steps_weight_version():
    from megatron_s2lpo.rollout.validation import AnswerRules, InvalidAnswerError

    engine = WindowEngine(3)
    strict = GroupCollector(learner=engine, sampling=SAMPLING, group_size=2, t_mix=0, rules=AnswerRules(vocab_size=128))
    assert strict.collect(prompts(1), step=4)  # step 4 samples with the weights synced after step 3
    for step, expected in ((5, "expects version 4"), (3, "expects version 2")):  # a missed update; newer weights
        with pytest.raises(InvalidAnswerError, match=f"at step {step} was sampled with weight version 3, but the "
                                                     f"step {expected} \\(max_staleness=0\\)"):
            strict.collect(prompts(1), step=step)
    window = GroupCollector(learner=engine, sampling=SAMPLING, group_size=2, t_mix=0,
                            rules=AnswerRules(vocab_size=128, max_staleness=1))
    assert window.collect(prompts(1), step=5)  # one version behind: inside the window
    with pytest.raises(InvalidAnswerError, match=r"expects a version in \[4, 5\] \(max_staleness=1\)"):
        window.collect(prompts(1), step=6)
    # the frozen explorer's version is not the learner's: only its tokens and log-probs are checked
    mixed = GroupCollector(learner=engine, explorer=BadAnswerEngine(7, "logprobs", float("nan")), sampling=SAMPLING,
                           group_size=2, t_mix=8, rules=AnswerRules(vocab_size=128))
    with pytest.raises(InvalidAnswerError, match="explorer engine answer for prompt 'p0'.*log-prob nan"):
        mixed.collect(prompts(1), step=4)
    for c in (strict, window, mixed):
        c.close()
