"""Per-step metric sinks: JSONL (always), TensorBoard and Weights & Biases (when configured).

`<run.output_dir>/metrics.jsonl` holds one JSON object per line with `step` and flat metric
names (`reward/explorer`, `time/rollout`, ...). A resumed run first drops the lines of steps
after its checkpoint (`truncate_after`), so the file reads like one uninterrupted run. Each
checkpoint also carries its step's metrics: a run killed after saving a step but before logging it
gets that line back on resume, without `time/checkpoint` and `time/step` (measured after the save).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from megatron_s2lpo.config import LoggingConfig
from megatron_s2lpo.utils.files import write_atomic

METRICS_FILE = "metrics.jsonl"


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
