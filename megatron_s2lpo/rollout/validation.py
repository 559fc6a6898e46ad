"""Checks on what a rollout engine answered, before any of it is scored or trained on.

Any engine (an SGLang server, the local engine, an explorer store) and any file of rollouts (the
pending rollouts a one-step-ahead checkpoint carries) can hand back an answer that would poison
a step silently or fail it far away: a token id outside the vocabulary ends in an IndexError in
the learner's embedding, and one that is not an integer (7.9) would be truncated to another
token; a NaN log-prob turns the importance ratio and the mismatch metrics into NaN, and one above
0 (a probability above 1: +50 makes every importance weight exp(old - 50) ~ 0) silently zeroes
the step's gradient; a loss mask other than 0/1 scales tokens; a completion drawn with other
weights than the step expects trains on-policy math on off-policy samples. `check_rollouts`
refuses all of them, naming the engine (or file), the request (prompt, sample) and the value.
Every rollout goes through it, whoever produced it (GroupCollector for engines and the explorer
store, trainer/pipeline.py for the pending rollouts of a checkpoint).

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


# log p <= 0; rounding in a low-precision engine may put a near-certain token a hair above it.
MAX_LOGPROB = 1e-3


def is_token_id(value: object) -> bool:
    """An int (not a bool, not a float that happens to be whole)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_tokens(rollout: Rollout, vocab_size: int, *, engine: str) -> None:
    """Integer token ids in [0, vocab_size), finite log-probs <= 0 (MAX_LOGPROB), a 0/1 loss mask
    and a finite reward (if any), or InvalidAnswerError naming the first bad value."""
    for what, ids in (("prompt ", rollout.prompt_ids), ("", rollout.response_ids)):
        for position, token in enumerate(ids):
            if not is_token_id(token):
                raise InvalidAnswerError(
                    f"{_where(engine, rollout)}: {what}token id {token!r} at position {position} is not an integer "
                    f"({type(token).__name__}); refusing to truncate it to another token")
            if not 0 <= token < vocab_size:
                raise InvalidAnswerError(
                    f"{_where(engine, rollout)}: {what}token id {token} at position {position} is outside the "
                    f"learner's vocabulary [0, {vocab_size}); the engine serves a model with another tokenizer or "
                    "vocabulary than the learner (check its model_path)")
    for position, logprob in enumerate(rollout.response_logprobs):
        number = isinstance(logprob, (int, float)) and not isinstance(logprob, bool)
        if not number or not math.isfinite(logprob):
            raise InvalidAnswerError(
                f"{_where(engine, rollout)}: log-prob {logprob!r} at position {position} (token "
                f"{rollout.response_ids[position]}) is not finite (or not a number); the engine's numerics failed "
                "(overflow in low precision, a corrupt weight update); check the server log")
        if logprob > MAX_LOGPROB:
            raise InvalidAnswerError(
                f"{_where(engine, rollout)}: log-prob {logprob} at position {position} (token "
                f"{rollout.response_ids[position]}) is above 0, a probability above 1: not a log-prob of a "
                "sampled token (a tampered file or a broken engine); its importance weights would zero the step")
    mask = rollout.loss_mask or []
    bad = next((m for m in mask if m not in (0, 1) or isinstance(m, float)), None)
    if bad is not None:
        raise InvalidAnswerError(f"{_where(engine, rollout)}: loss mask value {bad!r}; expected 0 or 1 per token")
    if rollout.reward is not None and (not isinstance(rollout.reward, (int, float)) or isinstance(rollout.reward, bool)
                                       or not math.isfinite(rollout.reward)):
        raise InvalidAnswerError(f"{_where(engine, rollout)}: reward {rollout.reward!r} is not a finite number")


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
