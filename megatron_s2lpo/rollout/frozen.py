"""Frozen engines stay frozen: a log-prob fingerprint of the explorer's (or teacher's) weights.

    guard = FrozenGuard(engine, "explorer", vocab_size=V, tolerance=1e-2, path=run_dir / FINGERPRINT_FILE)
    guard.check_if_disturbed(step, every=0)   # rank 0, before each step's collection

Nothing may change a frozen model's weights during a run, but several paths can: a replica
restarted after a crash or a hang (relaunched from its model path, which must still hold the same
checkpoint), a memory release and resume (`release_memory_occupation` with the weights tag frees
them; without a CPU backup SGLang resumes into uninitialised memory), a resumed run attached to a
server that now serves another model. The fingerprint is the engine's teacher-forced log-probs
(`score`, a prefill with no sampling) of fixed random token sequences; it is taken when the run
starts (and written to the run directory, so a resume compares against the first start) and
compared again after every restart or memory release the engine reports, and every `every` steps.
A mean |difference| above `tolerance` raises `FrozenWeightsError` naming the engine and the event.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from megatron_s2lpo.utils.files import write_atomic

from .scoring import ScoreRequest

FINGERPRINT_FILE = "frozen_fingerprints.json"


class FrozenWeightsError(RuntimeError):
    """A frozen engine's log-probs changed: its weights are not the ones the run started with."""


def fingerprint(engine: Any, *, vocab_size: int, num_sequences: int = 4, prompt_len: int = 8,
                response_len: int = 16, seed: int = 20261) -> list[list[float]]:
    """The engine's log-probs of fixed random token sequences (teacher forced, temperature 1)."""
    gen = torch.Generator().manual_seed(seed)
    requests = []
    for i in range(num_sequences):
        ids = torch.randint(0, vocab_size, (prompt_len + response_len,), generator=gen).tolist()
        requests.append(ScoreRequest(request_id=f"frozen-fingerprint-{i}", prompt_ids=ids[:prompt_len],
                                     response_ids=ids[prompt_len:]))
    return [list(map(float, s.logprobs)) for s in engine.score(requests)]


def _events(engine: Any) -> tuple[int, int]:
    """(restarts, memory releases) the engine reports; 0 for an engine that has neither."""
    return int(getattr(engine, "num_restarts", 0)), int(getattr(engine, "num_memory_releases", 0))


class FrozenGuard:
    """The fingerprint of one frozen engine and the checks against it (module docstring)."""

    def __init__(self, engine: Any, name: str, *, vocab_size: int, tolerance: float, path: str | None = None,
                 compare_saved: bool = False) -> None:
        if not tolerance > 0:
            raise ValueError(f"rollout.frozen_check_tol must be > 0, got {tolerance}")
        self.engine, self.name, self.vocab_size, self.tolerance, self.path = engine, name, vocab_size, tolerance, path
        self.num_checks = 0
        saved = self._load().get(name) if compare_saved else None
        if saved is not None:  # a resumed run: the engine must still hold the first start's weights
            self.reference = saved
            self.check("the run was resumed")
        else:
            self.reference = fingerprint(engine, vocab_size=vocab_size)
            self._save()
        self._seen = _events(engine)

    def _load(self) -> dict:
        if not self.path or not os.path.isfile(self.path):
            return {}
        with open(self.path) as f:
            return json.load(f)

    def _save(self) -> None:
        if self.path:
            write_atomic(self.path, json.dumps({**self._load(), self.name: self.reference}))

    def check(self, why: str) -> float:
        """Compare the engine with the reference now; returns the mean |difference|."""
        now = fingerprint(self.engine, vocab_size=self.vocab_size)
        diffs = [abs(a - b) for ref, cur in zip(self.reference, now, strict=True)
                 for a, b in zip(ref, cur, strict=True)]
        mean = sum(diffs) / len(diffs)
        self.num_checks += 1
        if mean > self.tolerance:
            raise FrozenWeightsError(
                f"the frozen {self.name} engine ({getattr(self.engine, 'model_id', '') or type(self.engine).__name__}) "
                f"no longer holds the weights the run started with: after {why}, its log-probs of fixed sequences "
                f"differ by {mean:.3g} on average (max {max(diffs):.3g}; rollout.frozen_check_tol={self.tolerance:g}). "
                "A replica restarted from a model path that now holds another checkpoint, a memory release that "
                "freed the weights without a CPU backup, or another server at the configured URL; restart the "
                f"{self.name} server from the run's model and resume")
        return mean

    def check_if_disturbed(self, step: int, every: int = 0) -> float | None:
        """Check after a restart or memory release since the last check, and every `every` steps."""
        events = _events(self.engine)
        why = None
        if events[0] > self._seen[0]:
            why = f"{events[0] - self._seen[0]} replica restart(s) before step {step}"
        elif events[1] > self._seen[1]:
            why = f"{events[1] - self._seen[1]} memory release(s) before step {step}"
        elif every and step % every == 0:
            why = f"step {step} (rollout.frozen_check_every={every})"
        self._seen = events
        return None if why is None else self.check(why)
