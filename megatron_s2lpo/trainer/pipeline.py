"""Each step's scored groups for the loop: collected in the step, or one step ahead of it.

    rollouts = pipeline.next_batch(step)   # every rank: the step's scored groups (rank 0 collects)
    ...                                    # advantages, log-probs, PPO updates
    synced = pipeline.push_weights(step)   # every rank: the learner's engine gets version `step`
    metrics.update(pipeline.step_metrics())

run.max_staleness=0: next_batch(i) draws step i's prompts and collects their groups (the learner's
engine holds version i-1, every learner sample is on-policy), then push_weights(i) syncs version i.
With algo.dynamic_sampling a step's collection runs in rounds that draw more prompts until it has
its informative groups (dynamic_sampling.py); either way it is one collection of the step.

run.max_staleness=1: next_batch(i) hands over step i's groups, collected while step i-1 trained,
and starts collecting step i+1's in a background thread with the weights the engines hold
(version i-1), so that generation runs while the learner computes log-probs and trains step i.
push_weights(i) waits until step i+1's groups are complete, then syncs version i; step i+2 is
generated with version i:

    learner   | step i: log-probs, train |(wait)| sync v_i | step i+1: log-probs, train |(wait)| sync
    engines   | generate step i+1 with v_{i-1} |  (idle)  | generate step i+2 with v_i  |  ...

So every learner sample is exactly one version behind when it is trained on; the loop corrects
for that with truncated importance weights (loop.importance_correction). The explorer is frozen:
its samples have no learner version and keep the paper's treatment.

Why the push waits for the generation instead of pausing it: SGLang 0.5.23 pauses generation for
a weight update in abort mode (rollout/sglang_engine.py), so the requests in flight at the end of
a step, the longest ones, would lose their tokens and start over with the new weights; and a push
whose moment depends on timing would decide which samples see which weights, so neither a rerun
nor a resume could repeat the step. The cost is at most one sync per step: a step takes
max(generate, train) + sync instead of max(generate, train + sync).

Checkpoints: the loop saves step i after push_weights(i), when step i+1's groups are complete;
they go into the checkpoint (PENDING_FILE) and a resume trains on them, so a resumed run repeats
the uninterrupted one. Nothing is in flight after a run's last step: each stage of a staged run
starts with an empty pipeline.

Metrics (`step_metrics`): time/rollout and time/reward (the collection of this step's groups),
time/wait_rollout (seconds of this step the learner waited for rollouts; at staleness 0 the
whole collection), time/wait_train (seconds the learner's engines sat idle waiting for the
learner before the collection that started during this step), time/sync (the weight push, not
the wait before it), time/overlap (share of this step's
groups' collection time hidden behind the learner's work; 0 at staleness 0).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_s2lpo.config.algo import DynamicSamplingConfig
from megatron_s2lpo.reward.overlong import OverlongShaping
from megatron_s2lpo.rollout import GroupCollector
from megatron_s2lpo.rollout.engine import Completion, GenerateRequest
from megatron_s2lpo.trainer.dynamic_sampling import Collected, ScoredRound, collect_step
from megatron_s2lpo.types import FinishReason, Group, Prompt, Rollout, Source

PENDING_FILE = "pending_rollouts.safetensors"
PENDING_STATS_FILE = "pending_rollouts_stats.json"  # their dynamic-sampling and overlong metrics


class ScoringEngine:
    """Wraps an engine so each finished generate() call is queued for scoring at once.

    The explorer's completions are then scored while the learner's are still generating.
    Futures are keyed by (prompt ids, response ids): equal keys have equal rewards.
    """

    def __init__(self, inner: Any, stage: "RolloutStage") -> None:
        self.inner = inner
        self.stage = stage

    def generate(self, requests: list[GenerateRequest]) -> list[Completion]:
        comps = self.inner.generate(requests)
        self.stage.submit([(c.prompt_ids, c.token_ids, c.text) for c in comps])
        return comps

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class RolloutStage:
    """Rank 0: collect groups from both sources and score them (one collection at a time);
    `shaping` (reward/overlong.py) then shapes the rewards."""

    def __init__(self, collector: GroupCollector | None, scorer: Any, shaping: OverlongShaping | None = None) -> None:
        self.collector = collector
        self.scorer = scorer
        self.shaping = shaping
        self._truths: dict[tuple, str] = {}
        self._pending: dict[tuple, tuple[Any, int]] = {}

    def submit(self, items: list[tuple[list[int], list[int], str]]) -> None:
        items = [it for it in items if (tuple(it[0]), tuple(it[1])) not in self._pending]
        if not items:
            return
        future = self.scorer.submit([text for _, _, text in items],
                                    [self._truths[tuple(p)] for p, _, _ in items])
        for index, (p, r, _) in enumerate(items):
            self._pending[(tuple(p), tuple(r))] = (future, index)

    def collect(self, step: int, prompts: list[Prompt], upcoming: Sequence[list[Prompt]],
                temperature: float | None, *, first_index: int = 0) -> ScoredRound:
        """The groups of `prompts` with rewards, the verifier's scores, rollout seconds and the
        extra seconds waiting for rewards; `first_index` as in GroupCollector.collect."""
        self._truths = {tuple(p.token_ids): p.ground_truth for p in prompts}
        self._pending = {}
        start = time.perf_counter()
        groups = self.collector.collect(prompts, step, upcoming, temperature, first_index=first_index)
        self.collector.learner.offload()  # a colocated server frees its GPUs for training
        rollout_s = time.perf_counter() - start
        rollouts = [r for g in groups for r in g.rollouts]
        self.submit([(r.prompt_ids, r.response_ids, r.text) for r in rollouts])  # e.g. store samples
        for r in rollouts:
            future, index = self._pending[(tuple(r.prompt_ids), tuple(r.response_ids))]
            r.reward = float(future.result()[index])
        scores = [g.rewards() for g in groups]
        counts = self.shaping.apply(rollouts) if self.shaping is not None else {}
        return ScoredRound(groups=groups, scores=scores, rollout_s=rollout_s,
                           reward_s=time.perf_counter() - start - rollout_s, counts=counts)


@dataclass(slots=True)
class _Collection:
    """One step's collection: its outcome on rank 0 (a Future) and its timing."""

    step: int
    future: Future = field(default_factory=Future)
    launched: float = 0.0
    done: float = math.nan  # set by the collecting thread
    blocked: float = 0.0  # seconds the learner waited for it

    def seconds(self) -> float:
        return self.done - self.launched


class RolloutPipeline:
    """Every rank: the groups of each step, collected on rank 0 (module docstring)."""

    def __init__(self, *, stage: RolloutStage | None, sampler: Any, prompts: list[Prompt], groups: Any,
                 sync: Any, max_staleness: int, num_steps: int, prefetch_steps: int,
                 temperature: Callable[[int], float], dynamic: DynamicSamplingConfig | None = None) -> None:
        self.stage = stage  # None on ranks other than 0
        self.sampler = sampler
        self.dynamic = dynamic or DynamicSamplingConfig()  # rounds per step (dynamic_sampling.py)
        self.prompts = prompts
        self.groups = groups
        self.sync = sync
        self.ahead = max_staleness
        self.num_steps = num_steps
        self.prefetch_steps = prefetch_steps
        self.temperature = temperature
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="rollout-ahead") \
            if max_staleness and stage is not None else None
        self._next: _Collection | None = None  # the step being collected ahead
        self._last_done: float | None = None
        self._metrics: dict[str, float] = {}
        self._discarded: dict[str, float] = {}

    @property
    def is_driver(self) -> bool:
        return self.stage is not None

    # ----- the loop's calls

    def next_batch(self, step: int) -> list[Group]:
        """Step `step`'s scored groups on every rank; with max_staleness 1, step+1's collection starts."""
        from megatron_s2lpo.sync.collective import run_on_driver

        previous_done = self._last_done
        current = self._next if self._next is not None and self._next.step == step else None
        started = current is None
        start = time.perf_counter()  # at staleness 0 the collection runs inside _launch
        current = current or self._launch(step)
        self._next = None
        outcome: Collected = run_on_driver(lambda: current.future.result(), self.groups)
        if outcome.sampler_state is not None:  # the step's extra rounds drew prompts on rank 0
            self.sampler.load_state_dict(outcome.sampler_state)
        waited = time.perf_counter() - start
        current.blocked += waited
        self._last_done = current.done
        # the collection that starts during this step, and when the engines finished the one before it
        launched, idle_from = (current, previous_done) if started else (None, None)
        if self.ahead and step < self.num_steps:
            self._next = launched = self._launch(step + 1)
            idle_from = current.done
        idle = launched.launched - idle_from if launched is not None and idle_from is not None else 0.0
        seconds = current.seconds()
        self._metrics = {
            "time/rollout": outcome.rollout_s, "time/reward": outcome.reward_s, "time/wait_rollout": waited,
            "time/wait_train": idle if math.isfinite(idle) else 0.0,
            "time/overlap": min(1.0, max(0.0, 1.0 - current.blocked / seconds)) if seconds > 0 else math.nan,
            **outcome.metrics,
        }
        self._discarded = dict(outcome.discarded_tokens)
        return outcome.groups

    def discarded_tokens(self) -> dict[Source, float]:
        """Tokens the last step generated but does not train on (dynamic sampling), per source:
        they count in its rollout tokens and FLOPs (metrics.rollout_counts)."""
        return {source: self._discarded.get(source.value, 0.0) for source in Source}

    def push_weights(self, step: int) -> Any:
        """The learner's engine gets version `step` (every rank); with a step collected ahead,
        once its groups are complete (an error of that collection is raised on every rank)."""
        from megatron_s2lpo.sync.collective import run_on_driver

        if self._next is not None:
            pending = self._next

            def complete() -> None:  # rank 0 keeps the groups; the others learn only that they are done
                pending.future.result()

            start = time.perf_counter()
            run_on_driver(complete, self.groups)
            waited = time.perf_counter() - start
            pending.blocked += waited
            self._metrics["time/wait_rollout"] += waited
        start = time.perf_counter()
        synced = self.sync.sync(version=step)
        self._metrics["time/sync"] = time.perf_counter() - start
        return synced

    def step_metrics(self) -> dict[str, float]:
        """The last step's pipeline metrics (module docstring; NaN on ranks other than 0)."""
        if not self.is_driver:
            return dict.fromkeys(self._metrics, math.nan)
        return dict(self._metrics)

    # ----- checkpoints

    def checkpoint_files(self) -> dict[str, bytes]:
        """{PENDING_FILE: the groups collected ahead} (rank 0, once push_weights waited for them)."""
        pending = self._next
        if pending is None or not self.is_driver:
            return {}
        if not pending.future.done():
            raise RuntimeError(f"step {pending.step}'s rollouts are still being collected; checkpoint after "
                               "push_weights, which waits for them")
        outcome: Collected = pending.future.result()
        files = {PENDING_FILE: encode_groups(pending.step, outcome.groups, outcome.rollout_s, outcome.reward_s)}
        if outcome.metrics or outcome.discarded_tokens:
            stats = {"step": pending.step, "metrics": outcome.metrics, "discarded_tokens": outcome.discarded_tokens}
            files[PENDING_STATS_FILE] = json.dumps(stats, sort_keys=True).encode()
        return files

    def resume(self, checkpoint: str | Path, step: int) -> None:
        """After loading the checkpoint of `step`: the groups it holds for step+1, if any (every rank)."""
        from megatron_s2lpo.sync.collective import run_on_driver

        path = Path(checkpoint) / PENDING_FILE
        loaded: list[tuple] = []  # rank 0's copy; the other ranks learn only which step it holds

        def read() -> int | None:
            if not path.is_file():
                return None
            loaded.append(decode_groups(path.read_bytes(), {p.prompt_id: p for p in self.prompts}, where=str(path)))
            return loaded[0][0]

        saved_step = run_on_driver(read, self.groups)
        if saved_step is None or step >= self.num_steps:
            return
        if not self.ahead:
            raise ValueError(f"{path} holds step {saved_step}'s rollouts, generated one step ahead "
                             "(run.max_staleness=1) with the weights before this checkpoint's; resume with "
                             "run.max_staleness=1 to train on them as the run would have")
        if saved_step != step + 1:
            raise ValueError(f"{path} holds the rollouts of step {saved_step}, but its checkpoint is step {step}; "
                             "the checkpoint directory is inconsistent: remove it to resume from an earlier one")
        pending = _Collection(saved_step)  # collected before the restart: no timing of its own
        pending.future.set_result(self._read_pending(loaded[0], Path(checkpoint)) if self.is_driver else None)
        self._next = pending

    @staticmethod
    def _read_pending(loaded: tuple, checkpoint: Path) -> Collected:
        """The pending groups of a checkpoint with their metrics, if it saved any (rank 0)."""
        step, groups, rollout_s, reward_s = loaded
        outcome = Collected(groups=groups, rollout_s=rollout_s, reward_s=reward_s)
        path = checkpoint / PENDING_STATS_FILE
        if path.is_file():
            try:
                stats = json.loads(path.read_text())
                outcome.metrics = {str(k): float(v) for k, v in stats["metrics"].items()}
                outcome.discarded_tokens = {str(k): float(v) for k, v in stats["discarded_tokens"].items()}
                saved = int(stats["step"])
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise ValueError(f"{path} is damaged ({type(err).__name__}: {err}); remove its checkpoint directory "
                                 "to resume from the one before") from None
            if saved != step:
                raise ValueError(f"{path} describes step {saved}'s rollouts but {PENDING_FILE} holds step {step}'s; "
                                 "the checkpoint directory is inconsistent: remove it to resume from an earlier one")
        return outcome

    def close(self) -> None:
        """Wait for a collection in flight (its engines close after it), dropping its outcome."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    # ----- internals

    def _launch(self, step: int) -> _Collection:
        """Draw step's prompts (every rank: the samplers advance alike) and start collecting (rank 0)."""
        prompts = [self.prompts[i] for i in self.sampler.next_batch()]
        collection = _Collection(step, launched=time.perf_counter())
        if not self.is_driver:
            collection.future.set_result(None)
            return collection
        # a step's later prompts depend on its rounds under dynamic sampling: no look-ahead then
        ahead = copy.deepcopy(self.sampler) if self.prefetch_steps and self.stage.collector.prefetcher \
            and not self.dynamic.enabled else None
        upcoming = [[self.prompts[i] for i in ahead.next_batch()] for _ in range(self.prefetch_steps)] \
            if ahead is not None else []
        temperature = self.temperature(step)

        def draw() -> list[Prompt]:
            return [self.prompts[i] for i in self.sampler.next_batch()]

        def work() -> None:
            try:
                outcome = collect_step(self.stage, step, prompts, draw, temperature, upcoming, self.dynamic)
                if self.dynamic.enabled:  # every rank's sampler takes this state (next_batch)
                    outcome.sampler_state = self.sampler.state_dict()
            except BaseException as err:  # noqa: BLE001 - handed to the loop through the future
                collection.done = time.perf_counter()
                collection.future.set_exception(err)
                return
            collection.done = time.perf_counter()  # before the result: the loop reads it once woken
            collection.future.set_result(outcome)

        if self._executor is None:
            work()
        else:
            self._executor.submit(work)
        return collection


# ----------------------------------------------------------------------------- the pending groups file


def encode_groups(step: int, groups: list[Group], rollout_s: float, reward_s: float) -> bytes:
    """Scored groups as a safetensors file: token ids, log-probs (float64, exact) and loss masks
    as flat tensors, everything else as JSON in a uint8 tensor; nothing in it is executable."""
    from safetensors.torch import save

    rollouts = [r for g in groups for r in g.rollouts]
    meta = {"step": step, "rollout_s": rollout_s, "reward_s": reward_s,
            "groups": [{"prompt_id": g.prompt.prompt_id,
                        "rollouts": [[r.prompt_id, r.sample_index, r.source.value, r.finish_reason.value,
                                      r.weight_version, r.text, r.reward, len(r.prompt_ids), len(r.response_ids),
                                      0 if r.routed_experts is None else int(r.routed_experts.shape[1])]
                                     for r in g.rollouts]} for g in groups]}

    def flat(values: list[list], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor([v for row in values for v in row], dtype=dtype)

    routed = [r.routed_experts.reshape(-1).to(torch.int16) for r in rollouts if r.routed_experts is not None]
    return save({"meta": torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8),
                 "prompt_ids": flat([r.prompt_ids for r in rollouts], torch.int64),
                 "response_ids": flat([r.response_ids for r in rollouts], torch.int64),
                 "response_logprobs": flat([r.response_logprobs for r in rollouts], torch.float64),
                 "loss_mask": flat([r.loss_mask for r in rollouts], torch.int64),
                 "routed_experts": torch.cat(routed) if routed else torch.zeros(0, dtype=torch.int16)})


def decode_groups(data: bytes, prompts: dict[str, Prompt], *, where: str) -> tuple[int, list[Group], float, float]:
    """(step, groups, rollout seconds, reward seconds) of `encode_groups`' bytes; a damaged file or
    one naming prompts the dataset does not have is a ValueError naming `where`."""
    from safetensors.torch import load

    try:
        tensors = load(data)
        meta = json.loads(bytes(tensors["meta"].tolist()).decode())
        columns = {name: tensors[name].tolist() for name in ("prompt_ids", "response_ids", "response_logprobs",
                                                                "loss_mask")}
        routed = tensors.get("routed_experts", torch.zeros(0, dtype=torch.int16))
    except Exception as err:  # noqa: BLE001 - any damage reads the same to the user
        raise ValueError(f"{where} is damaged ({type(err).__name__}: {err}); remove its checkpoint directory "
                         "to resume from the one before") from None
    offsets = {"prompt": 0, "response": 0, "routed": 0}
    groups = []
    for group in meta["groups"]:
        prompt = prompts.get(group["prompt_id"])
        if prompt is None:
            raise ValueError(f"{where} holds rollouts of prompt {group['prompt_id']!r}, which the run's dataset "
                             "does not have; resume with the data the run started with")
        rollouts = []
        for prompt_id, index, source, finish, version, text, reward, n_prompt, n_response, *width in group["rollouts"]:
            p, r = offsets["prompt"], offsets["response"]
            offsets["prompt"], offsets["response"] = p + n_prompt, r + n_response
            routes = None
            if width and width[0]:  # files written before routing was recorded have no width
                size = (n_prompt + n_response - 1) * width[0]
                routes = routed[offsets["routed"]:offsets["routed"] + size].view(-1, width[0]).clone()
                offsets["routed"] += size
            rollouts.append(Rollout(prompt_id=prompt_id, sample_index=index, source=Source(source),
                                    prompt_ids=columns["prompt_ids"][p:p + n_prompt],
                                    response_ids=columns["response_ids"][r:r + n_response],
                                    response_logprobs=columns["response_logprobs"][r:r + n_response],
                                    finish_reason=FinishReason(finish), weight_version=version, text=text,
                                    loss_mask=columns["loss_mask"][r:r + n_response], reward=reward,
                                    routed_experts=routes))
        groups.append(Group(prompt=prompt, rollouts=rollouts))
    return meta["step"], groups, meta["rollout_s"], meta["reward_s"]
