"""Per-step metrics: their sinks, JSONL (always), TensorBoard and Weights & Biases (when
configured), and the pure functions that compute them.

`<run.output_dir>/metrics.jsonl` holds one JSON object per line with `step` and flat metric
names (`reward/explorer`, `time/rollout`, ...). A resumed run first drops the lines of steps
after its checkpoint (`truncate_after`), so the file reads like one uninterrupted run. Each
checkpoint also carries its step's metrics: a run killed after saving a step but before logging it
gets that line back on resume, without `time/checkpoint` and `time/step` (measured after the save).

Per source s in (explorer, learner), over the samples trained on this step:
  reward/s, accuracy/s (share with reward >= 1), response_len/s (tokens), share/s (share of
  the group), advantage/s (mean sequence advantage), logp_mismatch/s (mean |learner old
  log-prob - behaviour log-prob| over response tokens), rollout_tokens/s (prompt + response
  tokens generated or read this step) and rollout_flops/s (2 x params x tokens).
dynamic/* (algo.dynamic_sampling) and overlong/* (reward.overlong) come from the rollout
pipeline (trainer/dynamic_sampling.py, reward/overlong.py; docs/training.md).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch

from megatron_s2lpo.algo.batch import masked_mean
from megatron_s2lpo.algo.losses import truncated_importance_weights
from megatron_s2lpo.config import LoggingConfig
from megatron_s2lpo.rollout.validation import expected_learner_version
from megatron_s2lpo.trainer.run_dir import METRICS_FILE
from megatron_s2lpo.types import SOURCE_CODES, Group, Source, TrainBatch
from megatron_s2lpo.utils.files import write_atomic


def json_safe(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsWriter:
    def __init__(self, output_dir: str, config: LoggingConfig, *, run_name: str = "s2lpo") -> None:
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, METRICS_FILE)
        self.config = config
        self._tb = self._wandb = None
        if config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ValueError("logging.tensorboard=true but the tensorboard package is not importable "
                                 f"({err}); pip install tensorboard, or set logging.tensorboard=false") from None
            self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        if config.wandb_project:
            try:
                import wandb
            except ImportError:
                raise ValueError(f"logging.wandb_project={config.wandb_project!r} but wandb is not "
                                 "importable; pip install wandb, or set logging.wandb_project=''") from None
            self._wandb = wandb.init(project=config.wandb_project, name=run_name, resume="allow")

    def truncate_after(self, step: int) -> int | None:
        """Drop records of steps > `step` (written after the checkpoint a run resumes from).
        Returns the last step still logged (None if none)."""
        if not os.path.isfile(self.path):
            return None
        with open(self.path) as f:
            lines = [line for line in f if line.strip()]
        keep, kept_steps = [], []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if record.get("step", 0) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
                kept_steps.append(record.get("step", 0))
        write_atomic(self.path, "".join(keep))
        return max(kept_steps, default=None)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if step % self.config.log_every:
            return
        record = {"step": step, **{k: json_safe(v) for k, v in metrics.items()}}
        if self.config.jsonl:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


# ----------------------------------------------------------------------------- per-step values


def rollout_counts(groups: list[Group], params: dict[Source, int],
                   discarded: dict[Source, float] | None = None) -> dict[str, float]:
    """rollout_tokens/s and rollout_flops/s of every generated sample (before PODS), `discarded`
    tokens per source included (samples generated but not handed to the step: dynamic sampling)."""
    out: dict[str, float] = {}
    for source in Source:
        tokens = sum(len(r.prompt_ids) + len(r.response_ids) for g in groups for r in g.rollouts
                     if r.source is source) + (discarded or {}).get(source, 0.0)
        out[f"rollout_tokens/{source.value}"] = float(tokens)
        out[f"rollout_flops/{source.value}"] = 2.0 * params[source] * tokens
    return out


def source_metrics(batch: TrainBatch, rewards: torch.Tensor, seq_advantages: torch.Tensor) -> dict[str, float]:
    """rewards, seq_advantages: (B,) in batch row order."""
    out: dict[str, float] = {}
    response_lens = batch.loss_mask.sum(dim=1)  # (B,)
    mismatch = (batch.old_logprobs - batch.behaviour_logprobs).abs()  # (B, T)
    for source, code in SOURCE_CODES.items():
        rows = batch.sources == code  # (B,)
        name = source.value
        count = int(rows.sum())
        nan = float("nan")
        out[f"share/{name}"] = count / batch.num_seqs
        out[f"reward/{name}"] = float(rewards[rows].mean()) if count else nan
        out[f"accuracy/{name}"] = float((rewards[rows] >= 1.0).float().mean()) if count else nan
        out[f"response_len/{name}"] = float(response_lens[rows].mean()) if count else nan
        out[f"advantage/{name}"] = float(seq_advantages[rows].mean()) if count else nan
        out[f"logp_mismatch/{name}"] = masked_mean(mismatch[rows], batch.loss_mask[rows]) if count else nan
    out["reward/all"] = float(rewards.mean())
    out["accuracy/all"] = float((rewards >= 1.0).float().mean())
    return out


def mean_dicts(dicts: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for d in dicts for k in d})
    return {k: sum(d[k] for d in dicts if k in d) / sum(k in d for d in dicts) for k in keys}


def behaviour_mismatch(batch: TrainBatch, sources: tuple[int, ...] | None) -> float:
    """Mean |old - behaviour| log-prob over the loss tokens of the rows with these source codes
    (None: every row): the gap between the learner's numerics and the sampling engine's."""
    rows = _rows(batch, sources)
    return masked_mean((batch.old_logprobs - batch.behaviour_logprobs).abs()[rows], batch.loss_mask[rows])


def _rows(batch: TrainBatch, sources: tuple[int, ...] | None) -> torch.Tensor:
    """(B,) bool: the rows whose source code is in `sources` (None: every row)."""
    if sources is None:
        return torch.ones_like(batch.sources, dtype=torch.bool)
    return torch.isin(batch.sources, torch.tensor(sources))


def pods_counts(generated: list[Group], kept: list[Group]) -> dict[str, float]:
    """pods/generated_<source> and pods/kept_<source>: samples per source before and after PODS."""
    out: dict[str, float] = {}
    for source in Source:
        out[f"pods/generated_{source.value}"] = float(sum(g.num_from(source) for g in generated))
        out[f"pods/kept_{source.value}"] = float(sum(g.num_from(source) for g in kept))
    return out


def staleness_metrics(groups: list[Group], step: int) -> dict[str, float]:
    """staleness/mean and staleness/max: how many weight versions the learner's samples of `step`
    lag the learner that trains on them (0 on-policy; 1 with run.max_staleness=1), against the
    version an on-policy engine holds (rollout/validation.py). The frozen explorer has none."""
    on_policy = expected_learner_version(step)
    lags = [on_policy - r.weight_version for g in groups for r in g.rollouts if r.source is Source.LEARNER]
    if not lags:
        return {"staleness/mean": float("nan"), "staleness/max": float("nan")}
    return {"staleness/mean": sum(lags) / len(lags), "staleness/max": float(max(lags))}


def importance_metrics(batch: TrainBatch, threshold: float | None, sources: tuple[int, ...] | None
                       ) -> dict[str, float]:
    """train/is_weight_mean and train/is_clipped_frac over the loss tokens of the weighted rows
    (source codes `sources`, None: every row): the mean truncated weight min(pi_old / pi_behaviour,
    threshold) and the share of tokens where the cap applied. Empty without a threshold."""
    if threshold is None:
        return {}
    rows = _rows(batch, sources)
    old, behaviour, mask = batch.old_logprobs[rows], batch.behaviour_logprobs[rows], batch.loss_mask[rows]
    clipped = (old - behaviour) > math.log(threshold)
    return {"train/is_weight_mean": masked_mean(truncated_importance_weights(old, behaviour, threshold), mask),
            "train/is_clipped_frac": masked_mean(clipped.float(), mask)}
