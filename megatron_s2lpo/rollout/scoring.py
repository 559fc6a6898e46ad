"""Teacher scoring: per-token log-probs of given sequences under a frozen model (prefill only).

On-policy distillation needs log p_teacher(response[r] | prompt + response[:r]) for sequences
that another model (the student) sampled. An engine that can score implements

    score(requests: list[ScoreRequest]) -> list[TokenScores]     # one per request, same order

(`LocalEngine`: a teacher-forced forward pass; `SGLangEngine`: SGLang's /generate with
max_new_tokens 0 and input log-probs, see `sglang_client.parse_score_output`).

Temperature convention: teacher log-probs are always taken at temperature 1,
`log_softmax(logits)[token]` in float32, whatever temperature the student sampled at; the
top-k entries are the k largest entries of that same distribution, sorted descending.

`TeacherScorer` batches (prompt, response) pairs into engine calls and caches the answers for
the current step; `align_scores` lays the answers out like `TrainBatch` (types.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

# Fill value of `align_scores`' top-k log-probs outside the response tokens: finite, so that a
# softmax / logsumexp over K of a padded row is uniform instead of NaN (all -inf would give NaN,
# and NaN * 0 stays NaN under the loss mask), and far below any real log-prob.
TOPK_PAD_LOGPROB = -1e4


@dataclass(kw_only=True, slots=True)
class ScoreRequest:
    """Score `response_ids` after `prompt_ids` (the prompt's own tokens are not scored)."""

    request_id: str
    prompt_ids: list[int]
    response_ids: list[int]
    top_k: int = 0  # also return the teacher's top_k tokens per response position

    def __post_init__(self) -> None:
        where = f"score request {self.request_id!r}"
        if not self.prompt_ids:
            raise ValueError(f"{where}: prompt_ids is empty; the first response token needs a "
                             "prompt token to be predicted from")
        if not self.response_ids:
            raise ValueError(f"{where}: response_ids is empty; there is nothing to score")
        if self.top_k < 0:
            raise ValueError(f"{where}: top_k must be >= 0 (0: no top-k), got {self.top_k}")


@dataclass(kw_only=True, slots=True)
class TokenScores:
    """Teacher scores of one request's response tokens.

    logprobs[r] = log p(response[r] | prompt + response[:r]) at temperature 1. With top-k,
    top_ids[r] / top_logprobs[r] are the k most likely tokens of the distribution that
    predicts response[r] and their log-probs, sorted by log-prob descending.
    """

    request_id: str
    logprobs: list[float]
    top_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None

    def __post_init__(self) -> None:
        where = f"scores of {self.request_id!r}"
        if (self.top_ids is None) != (self.top_logprobs is None):
            raise ValueError(f"{where}: top_ids and top_logprobs come together")
        if self.top_ids is None:
            return
        if not len(self.top_ids) == len(self.top_logprobs) == len(self.logprobs):
            raise ValueError(f"{where}: {len(self.logprobs)} log-probs but {len(self.top_ids)} "
                             f"top-id rows and {len(self.top_logprobs)} top-log-prob rows")
        for r, (ids, lps) in enumerate(zip(self.top_ids, self.top_logprobs)):
            if len(ids) != len(lps):
                raise ValueError(f"{where}: row {r} has {len(ids)} top ids and {len(lps)} log-probs")

    @property
    def top_k(self) -> int:
        return len(self.top_ids[0]) if self.top_ids else 0


class TeacherScorer:
    """Scores (prompt_ids, response_ids) pairs with a frozen engine, batched and cached per step.

    `engine` is anything with `score(list[ScoreRequest]) -> list[TokenScores]`. Requests are sent
    `batch_size` at a time. Within a step (until `new_step`), a pair already scored, or repeated
    in the same call, is answered from the cache. Request ids are `teacher-<step>-<n>`, n
    counting the requests sent in the step, so a replayed step sends the same ids.
    """

    def __init__(self, engine, *, top_k: int = 0, batch_size: int = 256) -> None:
        if not callable(getattr(engine, "score", None)):
            raise ValueError(f"TeacherScorer: engine {type(engine).__name__} has no score() method; "
                             "use an engine that can score (LocalEngine, SGLangEngine)")
        if top_k < 0:
            raise ValueError(f"TeacherScorer: top_k must be >= 0, got {top_k}")
        if batch_size < 1:
            raise ValueError(f"TeacherScorer: batch_size must be >= 1, got {batch_size}")
        self.engine = engine
        self.top_k = top_k
        self.batch_size = batch_size
        self.hits = 0  # cumulative
        self.misses = 0  # cumulative
        self._step = 0
        self._cache: dict[tuple[tuple[int, ...], tuple[int, ...]], TokenScores] = {}
        self._step_requests = 0
        self._step_hits = 0
        self._step_tokens = 0
        self._step_seconds = 0.0

    def new_step(self, step: int) -> None:
        """Start step `step`: drop the cache and the per-step metrics."""
        self._step = step
        self._cache.clear()
        self._step_requests = self._step_hits = self._step_tokens = 0
        self._step_seconds = 0.0

    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[TokenScores]:
        """Teacher scores of each pair's response tokens, in order."""
        keys = [(tuple(prompt), tuple(response)) for prompt, response in pairs]
        todo: dict[tuple[tuple[int, ...], tuple[int, ...]], ScoreRequest] = {}
        for prompt, response in keys:
            if (prompt, response) in self._cache or (prompt, response) in todo:
                continue
            todo[(prompt, response)] = ScoreRequest(
                request_id=f"teacher-{self._step}-{self._step_requests + len(todo)}",
                prompt_ids=list(prompt), response_ids=list(response), top_k=self.top_k)
        hits = len(keys) - len(todo)
        self.hits += hits
        self.misses += len(todo)
        self._step_hits += hits

        todo_keys, requests = list(todo), list(todo.values())
        self._step_requests += len(requests)  # ids are taken even if a batch fails below
        start_time = time.perf_counter()
        try:
            for start in range(0, len(requests), self.batch_size):
                batch = requests[start:start + self.batch_size]
                answers = self.engine.score(batch)
                self._check(batch, answers)
                for key, req, answer in zip(todo_keys[start:], batch, answers):
                    self._cache[key] = answer
                    self._step_tokens += len(req.response_ids)
        finally:
            self._step_seconds += time.perf_counter() - start_time
        return [self._cache[key] for key in keys]

    def metrics(self) -> dict[str, float]:
        """The current step's figures (since the last `new_step`)."""
        return {
            "teacher/requests": float(self._step_requests),
            "teacher/cache_hits": float(self._step_hits),
            "teacher/tokens": float(self._step_tokens),
            "teacher/seconds": self._step_seconds,
        }

    def _check(self, batch: list[ScoreRequest], answers: list[TokenScores]) -> None:
        name = type(self.engine).__name__
        if len(answers) != len(batch):
            raise RuntimeError(f"{name}.score returned {len(answers)} answers for {len(batch)} requests")
        for req, answer in zip(batch, answers):
            if answer.request_id != req.request_id or len(answer.logprobs) != len(req.response_ids):
                raise RuntimeError(
                    f"{name}.score answered request {req.request_id!r} ({len(req.response_ids)} "
                    f"tokens) with {answer.request_id!r} ({len(answer.logprobs)} log-probs)")
            if req.top_k and answer.top_k != req.top_k:
                raise RuntimeError(f"{name}.score returned top-{answer.top_k} for request "
                                   f"{req.request_id!r}, which asked for top-{req.top_k}")


def align_scores(
    scores: list[TokenScores], prompt_lens: list[int], seq_len: int, top_k: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Lay teacher scores out like `TrainBatch` (B rows of T = seq_len columns).

    Response token r of row b is column prompt_lens[b] + r, so entry [b, t] scores token t
    given tokens[b, :t]. Returns
      logprobs (B, T) float32, zeros outside the response tokens;
      with top_k > 0: top ids (B, T, K) long (0 outside) and top log-probs (B, T, K) float32
      (TOPK_PAD_LOGPROB outside: finite, so softmax over K stays defined on padded rows);
      else None, None.
    Scores with more than top_k entries per row are cut to their first (largest) top_k.
    """
    if len(prompt_lens) != len(scores):
        raise ValueError(f"align_scores: {len(scores)} scores but {len(prompt_lens)} prompt_lens")
    num_rows = len(scores)
    logprobs = torch.zeros((num_rows, seq_len), dtype=torch.float32)
    top_ids = top_lps = None
    if top_k > 0:
        top_ids = torch.zeros((num_rows, seq_len, top_k), dtype=torch.long)
        top_lps = torch.full((num_rows, seq_len, top_k), TOPK_PAD_LOGPROB, dtype=torch.float32)
    for row, (score, start) in enumerate(zip(scores, prompt_lens)):
        end = start + len(score.logprobs)
        if start < 1 or end > seq_len:
            raise ValueError(f"align_scores: row {row} ({score.request_id!r}) has prompt length "
                             f"{start} and {len(score.logprobs)} response tokens; needs a prompt "
                             f"of >= 1 token and prompt + response <= seq_len {seq_len}")
        logprobs[row, start:end] = torch.tensor(score.logprobs, dtype=torch.float32)
        if top_k > 0:
            if score.top_k < top_k:
                raise ValueError(f"align_scores: row {row} ({score.request_id!r}) has top-"
                                 f"{score.top_k} scores, top_k={top_k} was asked for; score with "
                                 f"TeacherScorer(top_k={top_k})")
            top_ids[row, start:end] = torch.tensor([ids[:top_k] for ids in score.top_ids])
            top_lps[row, start:end] = torch.tensor([lps[:top_k] for lps in score.top_logprobs],
                                                   dtype=torch.float32)
    return logprobs, top_ids, top_lps
