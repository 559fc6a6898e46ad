"""Checks on what a rollout engine answered, before any of it is scored or trained on.

Any engine (an SGLang server, the local engine, an explorer store) can hand back an answer that
would poison a step silently or fail it far away: a token id outside the vocabulary ends in an
IndexError in the learner's embedding, a NaN log-prob turns the importance ratio and the
mismatch metrics into NaN, and a completion drawn with other weights than the step expects
trains on-policy math on off-policy samples. `check_rollouts` refuses all three, naming the
engine, the request (prompt, sample) and the value.

Weight versions: the learner's engine holds version i-1 while step i samples (the trainer syncs
version i after step i, and a resumed run syncs its checkpoint's step first). `max_staleness`
widens the accepted window to [i-1-max_staleness, i-1] for a pipeline that samples the next step
while the current one trains; newer versions than i-1 are never accepted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from ..types import Rollout


class InvalidAnswerError(RuntimeError):
    """An engine's answer cannot be trained on (token ids, log-probs or weight version)."""


@dataclass(kw_only=True, slots=True, frozen=True)
class AnswerRules:
    """What every completion must satisfy.

    vocab_size: token ids must lie in [0, vocab_size) (the learner's embedding rows).
    max_staleness: how many weight versions the learner's samples may lag the step's (0: none).
    """

    vocab_size: int
    max_staleness: int = 0

    def __post_init__(self) -> None:
        if self.vocab_size < 1:
            raise ValueError(f"AnswerRules.vocab_size must be >= 1, got {self.vocab_size}")
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {self.max_staleness}")


def expected_learner_version(step: int) -> int:
    """The weight version the learner's engine holds while `step` (1-indexed) samples."""
    return step - 1


def _where(engine: str, rollout: Rollout) -> str:
    return f"{engine} engine answer for prompt {rollout.prompt_id!r} (sample {rollout.sample_index})"


def check_tokens(rollout: Rollout, vocab_size: int, *, engine: str) -> None:
    """Token ids in [0, vocab_size) and finite log-probs, or InvalidAnswerError naming the first bad one."""
    for position, token in enumerate(rollout.response_ids):
        if not 0 <= token < vocab_size:
            raise InvalidAnswerError(
                f"{_where(engine, rollout)}: token id {token} at position {position} is outside the learner's "
                f"vocabulary [0, {vocab_size}); the engine serves a model with another tokenizer or vocabulary "
                "than the learner (check its model_path)")
    for position, logprob in enumerate(rollout.response_logprobs):
        if not math.isfinite(logprob):
            raise InvalidAnswerError(
                f"{_where(engine, rollout)}: log-prob {logprob} at position {position} (token "
                f"{rollout.response_ids[position]}) is not finite; the engine's numerics failed (overflow in "
                "low precision, a corrupt weight update); check the server log")


def check_version(rollout: Rollout, step: int, max_staleness: int = 0, *, engine: str = "learner") -> None:
    """The completion's weight version is the one `step` expects (within `max_staleness`)."""
    newest = expected_learner_version(step)
    oldest = max(0, newest - max_staleness)
    if oldest <= rollout.weight_version <= newest:
        return
    want = f"version {newest}" if oldest == newest else f"a version in [{oldest}, {newest}]"
    raise InvalidAnswerError(
        f"{_where(engine, rollout)} at step {step} was sampled with weight version {rollout.weight_version}, "
        f"but the step expects {want} (max_staleness={max_staleness}): the server holds other weights than "
        "the learner synced (a missed or failed weight update, or a server another run updated); restart it "
        "or let the trainer launch it")


def check_rollouts(rollouts: Iterable[Rollout], rules: AnswerRules, *, step: int, engine: str,
                   check_versions: bool) -> None:
    """Every rollout passes `check_tokens`, and `check_version` when `check_versions`."""
    for rollout in rollouts:
        check_tokens(rollout, rules.vocab_size, engine=engine)
        if check_versions:
            check_version(rollout, step, rules.max_staleness, engine=engine)
