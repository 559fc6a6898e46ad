"""Post-sync parity: do the engine and the learner assign the same log-probs to the same tokens?

The engine samples `num_sequences` short completions of fixed prompts (fixed token ids and
seeds, the same at every check) and returns its behaviour log-probs, log_softmax(logits / T) of
each sampled token. The learner recomputes the same quantity from its own weights
(`Learner.compute_logprobs(batch, T)`), and the metric is

    parity/mean_abs_logp_diff = mean over response tokens of |logp_learner - logp_engine|

(`max_abs_logp_diff` beside it). Identical weights in fp32 give ~1e-6; bf16 engines and
kernels ~1e-2; a missed or misnamed tensor gives O(1). Above `sync.parity_threshold` every rank
raises `WeightParityError`.

Distributed: the driver rank (global rank 0) talks to the engine and broadcasts the
completions, so every learner rank (all TP / PP / DP ranks) builds the same batch and takes
part in `compute_logprobs`, which returns the full (B, T) log-probs on every rank.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch

from megatron_s2lpo.rollout.engine import Completion, GenerateRequest, derive_seed
from megatron_s2lpo.types import TrainBatch

from .collective import run_on_driver
from .errors import WeightParityError, WeightVersionError
from .transports import describe_engine

PROMPT_LEN = 16  # tokens of the longest parity prompt (the others are 1-3 shorter)


class LogProbLearner(Protocol):
    """What the parity check needs from the learner (`learner.Learner` has it)."""

    def compute_logprobs(self, batch: TrainBatch, temperature: float = 1.0) -> torch.Tensor: ...


@dataclass(kw_only=True, slots=True)
class ParityReport:
    version: int | None  # the weight version the engine sampled with
    engine: str
    num_sequences: int
    num_tokens: int  # response tokens compared
    temperature: float
    mean_abs_diff: float
    max_abs_diff: float
    threshold: float

    @property
    def passed(self) -> bool:
        return self.mean_abs_diff <= self.threshold

    def metrics(self) -> dict[str, float]:
        return {"parity/mean_abs_logp_diff": self.mean_abs_diff, "parity/max_abs_logp_diff": self.max_abs_diff,
                "parity/num_tokens": float(self.num_tokens)}

    def to_dict(self) -> dict:
        return asdict(self)


def parity_requests(vocab_size: int, *, num_sequences: int, max_new_tokens: int, temperature: float,
                    seed: int = 0, prompt_len: int = PROMPT_LEN) -> list[GenerateRequest]:
    """Fixed prompts of random token ids (lengths prompt_len - i % 4) with fixed sampling seeds."""
    gen = torch.Generator().manual_seed(seed)
    requests = []
    for i in range(num_sequences):
        length = max(1, prompt_len - i % 4)  # unequal lengths: engine left padding, learner right padding
        prompt = torch.randint(0, vocab_size, (length,), generator=gen).tolist()
        requests.append(GenerateRequest(request_id=f"parity-{i}", prompt_ids=prompt, temperature=temperature,
                                        max_new_tokens=max_new_tokens, seed=derive_seed("parity", seed, i)))
    return requests


def completions_to_batch(samples: list[tuple[list[int], list[int], list[float]]]) -> TrainBatch:
    """(prompt ids, response ids, response log-probs) rows -> a right-padded TrainBatch.

    Alignment (types.py): the log-prob of response token j of row b sits at [b, P_b + j];
    loss_mask is 1 exactly there; `behaviour_logprobs` holds the engine's values.
    """
    seq_lens = [len(p) + len(r) for p, r, _ in samples]
    num_seqs, seq_len = len(samples), max(seq_lens)
    tokens = torch.zeros(num_seqs, seq_len, dtype=torch.long)  # (B, T)
    mask = torch.zeros(num_seqs, seq_len)  # (B, T)
    behaviour = torch.zeros(num_seqs, seq_len)  # (B, T)
    for b, (prompt, response, logprobs) in enumerate(samples):
        start, end = len(prompt), len(prompt) + len(response)
        tokens[b, :end] = torch.tensor(prompt + response, dtype=torch.long)
        mask[b, start:end] = 1.0
        behaviour[b, start:end] = torch.tensor(logprobs, dtype=torch.float32)
    zeros = torch.zeros(num_seqs, seq_len)
    return TrainBatch(tokens=tokens, loss_mask=mask, advantages=zeros, old_logprobs=behaviour.clone(),
                      behaviour_logprobs=behaviour, sources=torch.zeros(num_seqs, dtype=torch.long),
                      seq_lens=torch.tensor(seq_lens, dtype=torch.long))


def logprob_gap(learner_logprobs: torch.Tensor, batch: TrainBatch) -> tuple[float, float, int]:
    """(mean, max, count) of |learner - engine| over the batch's response tokens."""
    mask = batch.loss_mask > 0  # (B, T)
    diff = (learner_logprobs.double() - batch.behaviour_logprobs.double()).abs()[mask]
    if diff.numel() == 0:
        raise ValueError("the parity batch has no response tokens to compare")
    return float(diff.mean()), float(diff.max()), int(diff.numel())


def parity_message(report: ParityReport) -> str:
    return (
        f"weight parity check failed{'' if report.version is None else f' at weight version {report.version}'}: "
        f"log-probs of {report.num_tokens} response tokens that {report.engine} sampled "
        f"({report.num_sequences} sequences, temperature {report.temperature}) differ from the learner's "
        f"recomputation by mean |delta logp| = {report.mean_abs_diff:.3g} (max {report.max_abs_diff:.3g}), "
        f"above sync.parity_threshold={report.threshold:g}. Likely causes: the weights did not reach the "
        "engine (a failed or partial sync, a tensor name the engine ignored), the engine and the learner "
        "were built from different configs (rope_theta, rms_norm_eps, tied embeddings, vocabulary, "
        "qk-norm), the engine samples at another temperature, or lower-precision kernels on one side "
        "(bf16 / fp8: raise sync.parity_threshold to what identical weights give)")


def check_parity(engine: Any, learner: LogProbLearner, groups: Any, *, vocab_size: int,
                 num_sequences: int, max_new_tokens: int, threshold: float, temperature: float = 1.0,
                 version: int | None = None, seed: int = 0) -> ParityReport:
    """Compare the engine's log-probs of its own samples with the learner's (all ranks call it).

    engine: needed on the driver rank only. version: the weight version the engine must report
    on every completion (None: not checked). Raises WeightParityError on every rank when the
    mean gap exceeds `threshold`, WeightVersionError when the engine sampled another version.
    """
    def sample() -> tuple[str, list[tuple[list[int], list[int], list[float]]]]:
        requests = parity_requests(vocab_size, num_sequences=num_sequences, max_new_tokens=max_new_tokens,
                                   temperature=temperature, seed=seed)
        completions: list[Completion] = engine.generate(requests)
        stale = sorted({c.weight_version for c in completions} - {version}) if version is not None else []
        if stale:
            raise WeightVersionError(f"{describe_engine(engine)} sampled the parity completions with weight "
                                     f"version(s) {stale}, expected {version}")
        return describe_engine(engine), [(c.prompt_ids, c.token_ids, c.logprobs) for c in completions]

    engine_name, samples = run_on_driver(sample, groups)
    batch = completions_to_batch(samples)
    learner_logprobs = learner.compute_logprobs(batch, temperature)  # (B, T), the same on every rank
    mean, largest, count = logprob_gap(learner_logprobs, batch)
    report = ParityReport(version=version, engine=engine_name, num_sequences=len(samples), num_tokens=count,
                          temperature=temperature, mean_abs_diff=mean, max_abs_diff=largest, threshold=threshold)
    if not report.passed:
        raise WeightParityError(parity_message(report), report)
    return report
