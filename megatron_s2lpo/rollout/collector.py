"""GroupCollector: one GRPO group per prompt, sampled by the explorer and the learner.

At step i the group of size G is split by the S2L-PO schedule into (g_explorer, g_learner) =
`split_group(i, G, t_mix, ...)`. The explorer's samples come from the live explorer engine or
from an `ExplorerPrefetcher` (explorer store, prefetched); the learner's from the learner's
engine. Both sources are requested at the same time, each in its own worker thread (engines
are synchronous; `SGLangEngine` runs its own event loop), so the step waits for the slower one
only.

Order inside a group (the `sample_index` of each Rollout): the g_explorer explorer samples
first (0 .. g_explorer-1), then the g_learner learner samples (g_explorer .. G'-1), each
source in the order its engine returned them. Every rollout keeps the weight version its
engine reported (the frozen explorer: 0).

Answers: with `rules` (the trainer always passes them) every completion is checked before it
leaves the collector (validation.py): token ids inside the learner's vocabulary, finite
log-probs, and the learner's samples drawn with the weight version the step expects.

Routing (mixture-of-experts learners, `learner_routing`): the learner's requests ask its engine
for the experts every token was routed to (Rollout.routed_experts); the explorer's never do.

Seeds: sample j of source s for the k-th prompt of step i is drawn with
derive_seed(seed, i, s, k, prompt_id, j), so runs are reproducible per step and a resumed run
samples the same as an uninterrupted one (given the same weights). A step whose prompts come in
several rounds (dynamic sampling) passes `first_index`, the number of its prompts collected
before: k counts the step's prompts over all its rounds, so no two samples share a seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from ..algo.schedule import split_group
from ..config.algo import AlgoConfig
from ..config.rollout import SamplingConfig
from ..types import Group, Prompt, Rollout, Source
from .engine import GenerateRequest, RolloutEngine, derive_seed
from .explorer import ExplorerPrefetcher, prompt_token_ids
from .validation import AnswerRules, check_rollouts


class GroupCollector:
    """Builds each step's groups from both engines, concurrently."""

    def __init__(
        self,
        *,
        learner: RolloutEngine,
        sampling: SamplingConfig,
        group_size: int,
        t_mix: int,
        explorer: RolloutEngine | None = None,
        explorer_sampling: SamplingConfig | None = None,
        prefetcher: ExplorerPrefetcher | None = None,
        schedule: str = "linear",
        rounding: str = "paper",
        constant_share: float = 0.5,
        seed: int = 0,
        rules: AnswerRules | None = None,
        learner_routing: bool = False,
    ) -> None:
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.learner = learner
        self.explorer = explorer
        self.prefetcher = prefetcher
        self.sampling = sampling
        self.explorer_sampling = explorer_sampling or sampling
        self.group_size = group_size
        self.t_mix = t_mix
        self.schedule = schedule
        self.rounding = rounding
        self.constant_share = constant_share
        self.seed = seed
        self.rules = rules
        self.learner_routing = learner_routing  # ask the learner's engine for its routed experts (MoE)
        split_group(1, group_size, t_mix, schedule=schedule, rounding=rounding,
                    constant_share=constant_share)  # validate the schedule options now
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="collector")

    @classmethod
    def from_config(cls, algo: AlgoConfig, *, learner: RolloutEngine, sampling: SamplingConfig,
                    explorer: RolloutEngine | None = None,
                    explorer_sampling: SamplingConfig | None = None,
                    prefetcher: ExplorerPrefetcher | None = None, seed: int = 0) -> "GroupCollector":
        return cls(learner=learner, sampling=sampling, group_size=algo.group_size, t_mix=algo.t_mix,
                   explorer=explorer, explorer_sampling=explorer_sampling, prefetcher=prefetcher,
                   schedule=algo.schedule, rounding=algo.rounding,
                   constant_share=algo.constant_share, seed=seed)

    def split(self, step: int) -> tuple[int, int]:
        """(g_explorer, g_learner) at 1-indexed `step`."""
        return split_group(step, self.group_size, self.t_mix, schedule=self.schedule,
                           rounding=self.rounding, constant_share=self.constant_share)

    def prefetch(self, step: int, prompts: list[Prompt], *, first_index: int = 0) -> None:
        """Start loading the explorer share of a step (no-op without a prefetcher).

        Steps go to the prefetcher in increasing order; one already submitted with the same
        prompts is a no-op."""
        num_explorer, _ = self.split(step)
        if self.prefetcher is not None and num_explorer:
            self.prefetcher.submit(step, prompts, num_explorer, first_index=first_index)

    def collect(self, prompts: list[Prompt], step: int, upcoming: Sequence[list[Prompt]] = (),
                temperature: float | None = None, *, first_index: int = 0) -> list[Group]:
        """One Group per prompt (same order), explorer samples first.

        `upcoming`: the prompts of steps step+1, step+2, ... whose explorer samples the
        prefetcher (if any) starts loading now, after this step's. `temperature`: the learner's
        sampling temperature this step (None: its sampling config's). `first_index`: the step's
        prompts collected before these (module docstring).
        """
        num_explorer, num_learner = self.split(step)
        for prompt in prompts:
            prompt_token_ids(prompt)
        if num_explorer and self.explorer is None and self.prefetcher is None:
            raise ValueError(f"step {step} needs {num_explorer} explorer samples per prompt "
                             f"(t_mix={self.t_mix}) but the collector has no explorer engine and "
                             "no explorer store; configure rollout.explorer or rollout.explorer_store")
        if upcoming and first_index:
            raise ValueError("explorer samples of later steps are prefetched with a step's first prompts only "
                             f"(first_index=0), got first_index={first_index}")
        self.prefetch(step, prompts, first_index=first_index)
        for ahead, future_prompts in enumerate(upcoming, start=1):
            self.prefetch(step + ahead, future_prompts)
        explorer_job = learner_job = None
        if num_explorer:
            explorer_job = self._pool.submit(self._explorer_rollouts, prompts, step, num_explorer, first_index)
        if num_learner:
            sampling = self.sampling if temperature is None else replace(self.sampling, temperature=temperature)
            learner_job = self._pool.submit(self._learner_rollouts, prompts, step, num_learner,
                                            num_explorer, sampling, first_index)
        # Wait for both before raising, so no job outlives a failed step.
        errors, results = [], {}
        for name, job in (("explorer", explorer_job), ("learner", learner_job)):
            if job is None:
                results[name] = [[] for _ in prompts]
                continue
            try:
                results[name] = job.result()
            except BaseException as err:  # noqa: BLE001 - re-raised below
                errors.append(err)
        if errors:
            raise errors[0]
        return [Group(prompt=prompt, rollouts=results["explorer"][k] + results["learner"][k])
                for k, prompt in enumerate(prompts)]

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _requests(self, prompts: list[Prompt], step: int, source: Source, num: int,
                  sampling: SamplingConfig, first_index: int) -> list[GenerateRequest]:
        """num requests per prompt, prompt-major, with per-sample seeds."""
        routing = self.learner_routing and source is Source.LEARNER  # never the explorer's (another model)
        return [
            GenerateRequest.from_sampling(
                f"s{step}/{source.value}/{k}/{prompt.prompt_id}/{j}", prompt_token_ids(prompt), sampling,
                seed=derive_seed(self.seed, step, source.value, k, prompt.prompt_id, j),
                return_routed_experts=routing)
            for k, prompt in enumerate(prompts, start=first_index) for j in range(num)
        ]

    def _learner_rollouts(self, prompts: list[Prompt], step: int, num: int, offset: int,
                          sampling: SamplingConfig, first_index: int) -> list[list[Rollout]]:
        requests = self._requests(prompts, step, Source.LEARNER, num, sampling, first_index)
        comps = self.learner.generate(requests)
        out = [[comps[k * num + j].to_rollout(prompt_id=prompt.prompt_id, sample_index=offset + j,
                                              source=Source.LEARNER)
                for j in range(num)] for k, prompt in enumerate(prompts)]
        return self._checked(out, step, Source.LEARNER)

    def _explorer_rollouts(self, prompts: list[Prompt], step: int, num: int,
                           first_index: int) -> list[list[Rollout]]:
        if self.prefetcher is not None:
            samples = self.prefetcher.get(step, prompts, num, first_index=first_index)
            out = [[s.to_rollout(sample_index=j) for j, s in enumerate(group)] for group in samples]
        else:
            requests = self._requests(prompts, step, Source.EXPLORER, num, self.explorer_sampling, first_index)
            comps = self.explorer.generate(requests)  # type: ignore[union-attr]
            out = [[comps[k * num + j].to_rollout(prompt_id=prompt.prompt_id, sample_index=j,
                                                  source=Source.EXPLORER)
                    for j in range(num)] for k, prompt in enumerate(prompts)]
        return self._checked(out, step, Source.EXPLORER)

    def _checked(self, rollouts: list[list[Rollout]], step: int, source: Source) -> list[list[Rollout]]:
        # The frozen explorer's version is whatever its server started with: only the
        # learner's samples must match the step's weights.
        if self.rules is not None:
            check_rollouts((r for group in rollouts for r in group), self.rules, step=step, engine=source.value,
                           check_versions=source is Source.LEARNER)
        return rollouts
