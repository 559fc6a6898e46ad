"""Explorer samples off the critical path: fill a store offline, prefetch upcoming steps.

`fill_store` is the engine behind `s2lpo explore`: it asks a (frozen) explorer engine for
`num_samples` completions of every prompt and appends them to an explorer store, resuming
where an interrupted fill stopped.

`ExplorerPrefetcher` supplies the explorer share of each step. `submit(step, prompts, n)`
schedules, in a background worker, the takes from the store and (for prompts the store cannot
serve) live generation by the explorer engine; `get(step, ...)` returns the result, waiting
only if it is not ready. Steps must be submitted in increasing order (anything else is a
ValueError): the worker runs them in that order, so the store cursor moves the same way in
every run. A step that collects its prompts in several rounds (dynamic sampling) submits each
round with `first_index`, the number of the step's prompts before it: (step, first_index) is
the order. `state_dict()` is the store cursor as of the last step handed out by `get`, so a
resumed run takes the same samples.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

from ..config.rollout import SamplingConfig
from ..types import Prompt
from .engine import GenerateRequest, RolloutEngine, derive_seed
from .store import ExplorerSample, StoreReader, StoreWriter

LIVE_SAMPLE_INDEX = -1  # ExplorerSample.sample_index of a sample generated live (not stored)


def prompt_token_ids(prompt: Prompt) -> list[int]:
    if not prompt.token_ids:
        raise ValueError(f"prompt {prompt.prompt_id!r} has no token_ids; tokenize prompts before "
                         "asking an engine for rollouts")
    return list(prompt.token_ids)


def fill_store(
    engine: RolloutEngine,
    prompts: list[Prompt],
    num_samples: int,
    sampling: SamplingConfig,
    out_dir: str,
    *,
    explorer_model: str = "",
    seed: int = 0,
    batch_size: int = 256,
    shard_records: int = 4096,
) -> dict:
    """Generate until every prompt has `num_samples` stored samples; returns counts.

    Sample j of a prompt is drawn with seed derive_seed(seed, "fill", prompt_id, j), so a
    resumed or repeated fill with the same engine produces the same store. Every batch is
    flushed as its own shard, so an interruption loses at most one batch.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    unique = list({p.prompt_id: p for p in prompts}.values())
    writer = StoreWriter(out_dir, shard_records=shard_records)
    todo = [(p, j) for p in unique for j in range(writer.num_samples(p.prompt_id), num_samples)]
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        requests = [GenerateRequest.from_sampling(f"fill/{p.prompt_id}/{j}", prompt_token_ids(p), sampling,
                                                  seed=derive_seed(seed, "fill", p.prompt_id, j))
                    for p, j in chunk]
        for (prompt, j), req, comp in zip(chunk, requests, engine.generate(requests), strict=True):
            sample = writer.add(prompt.prompt_id, comp, explorer_model=explorer_model,
                                sampling=req.sampling_params())
            assert sample.sample_index == j, (sample.sample_index, j)
        writer.flush()
    writer.close()
    return {"store_dir": out_dir, "num_prompts": len(unique), "num_generated": len(todo),
            "num_samples": num_samples}


class ExplorerPrefetcher:
    """Background supply of explorer samples: from a store, else from the live explorer."""

    def __init__(
        self,
        *,
        reader: StoreReader | None = None,
        engine: RolloutEngine | None = None,
        sampling: SamplingConfig | None = None,
        seed: int = 0,
        explorer_model: str = "",
    ) -> None:
        if reader is None and engine is None:
            raise ValueError("ExplorerPrefetcher needs an explorer store reader, a live explorer "
                             "engine, or both")
        if engine is not None and sampling is None:
            raise ValueError("ExplorerPrefetcher: pass the explorer's sampling config with engine=")
        self.reader = reader
        self.engine = engine
        self.sampling = sampling
        self.seed = seed
        self.explorer_model = explorer_model
        self.num_from_store = 0
        self.num_live = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="explorer-prefetch")
        self._pending: dict[tuple[int, int], tuple[list[str], int, Future]] = {}
        # (step, first_index) -> store cursor before its takes
        self._snapshots: dict[tuple[int, int], dict] = {}
        self._last_submitted = (0, 0)
        self._lock = threading.Lock()

    def submit(self, step: int, prompts: list[Prompt], num_per_prompt: int, *, first_index: int = 0) -> None:
        """Schedule the explorer samples of `step` (no-op if already scheduled identically);
        `first_index`: the step's prompts collected before these (module docstring)."""
        ids = [p.prompt_id for p in prompts]
        key = (step, first_index)
        where = f"step {step}" + (f" from prompt {first_index}" if first_index else "")
        with self._lock:
            if key in self._pending:
                old_ids, old_num, _ = self._pending[key]
                if old_ids != ids or old_num != num_per_prompt:
                    raise ValueError(f"explorer prefetch for {where} was submitted with other "
                                     f"prompts or counts ({len(old_ids)} prompts x {old_num}, now "
                                     f"{len(ids)} x {num_per_prompt})")
                return
            if key <= self._last_submitted:
                raise ValueError(f"explorer prefetch: {where} was already submitted; submit steps "
                                 f"in increasing order (last submitted: step {self._last_submitted[0]})")
            future = self._pool.submit(self._load, key, list(prompts), num_per_prompt)
            self._pending[key] = (ids, num_per_prompt, future)
            self._last_submitted = key

    def get(self, step: int, prompts: list[Prompt], num_per_prompt: int, *,
            first_index: int = 0) -> list[list[ExplorerSample]]:
        """`num_per_prompt` explorer samples for each prompt of `step`, aligned with `prompts`."""
        self.submit(step, prompts, num_per_prompt, first_index=first_index)
        key = (step, first_index)
        future = self._pending[key][2]
        try:
            return future.result()
        finally:
            with self._lock:
                del self._pending[key]
                self._snapshots.pop(key, None)

    def pending_steps(self) -> list[int]:
        with self._lock:
            return sorted({step for step, _ in self._pending})

    def state_dict(self) -> dict:
        """The store cursor after the last step handed out by `get` (for checkpoints)."""
        if self.reader is None:
            return {}
        with self._lock:
            if self._snapshots:
                return self._snapshots[min(self._snapshots)]
            return self.reader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.pending_steps():
            raise RuntimeError("load_state_dict on a prefetcher with steps in flight; restore first")
        if self.reader is not None and state:
            self.reader.load_state_dict(state)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _load(self, key: tuple[int, int], prompts: list[Prompt], num: int) -> list[list[ExplorerSample]]:
        with self._lock:
            snapshot = self.reader.state_dict() if self.reader is not None else None
            if snapshot is not None:
                self._snapshots[key] = snapshot
        try:
            return self._take_or_generate(*key, prompts, num)
        except BaseException:
            if snapshot is not None:  # leave the cursor as if this step never ran
                self.reader.load_state_dict(snapshot)
            raise

    def _check_stored(self, prompt: Prompt, samples: list[ExplorerSample]) -> list[ExplorerSample]:
        """Stored samples must continue this run's prompt tokens: a store filled with another
        template or tokenizer would train on completions of a different prompt."""
        for sample in samples:
            if sample.prompt_ids != list(prompt.token_ids):
                raise ValueError(
                    f"explorer store {self.reader.store_dir}: sample {sample.sample_index} of prompt "
                    f"{prompt.prompt_id!r} was generated from other prompt tokens ({len(sample.prompt_ids)} tokens, "
                    f"this run's prompt has {len(prompt.token_ids)}): the store is stale, filled with another "
                    "template, tokenizer or dataset version; refill it with `s2lpo explore` for this recipe")
        return samples

    def _take_or_generate(self, step: int, first_index: int, prompts: list[Prompt],
                          num: int) -> list[list[ExplorerSample]]:
        results: list[list[ExplorerSample]] = []
        requests: list[GenerateRequest] = []
        slots: list[int] = []
        for k, prompt in enumerate(prompts, start=first_index):
            have = 0 if self.reader is None else min(num, self.reader.num_available(prompt.prompt_id))
            results.append(self._check_stored(prompt, self.reader.take(prompt.prompt_id, have)) if have else [])
            self.num_from_store += have
            if have < num and self.engine is None:
                raise ValueError(
                    f"explorer store {self.reader.store_dir} has {have} unused samples of prompt "
                    f"{prompt.prompt_id!r} but step {step} needs {num}, and no live explorer engine "
                    "is configured; fill the store further, open it with reuse, or configure "
                    "rollout.explorer")
            for j in range(have, num):
                seed = derive_seed(self.seed, "explorer", step, k, prompt.prompt_id, j)
                requests.append(GenerateRequest.from_sampling(
                    f"explorer/s{step}/{k}/{prompt.prompt_id}/{j}", prompt_token_ids(prompt),
                    self.sampling, seed=seed))
                slots.append(k - first_index)
        if requests:
            for k, req, comp in zip(slots, requests, self.engine.generate(requests), strict=True):
                results[k].append(ExplorerSample.from_completion(
                    comp, prompt_id=prompts[k].prompt_id, sample_index=LIVE_SAMPLE_INDEX,
                    explorer_model=self.explorer_model, sampling=req.sampling_params()))
            self.num_live += len(requests)
        return results
