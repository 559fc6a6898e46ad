"""Logging section: where per-step metrics go."""

from __future__ import annotations

from dataclasses import dataclass

from .base import check


@dataclass(kw_only=True, slots=True)
class LoggingConfig:
    jsonl: bool = True  # <run.output_dir>/metrics.jsonl
    tensorboard: bool = False
    wandb_project: str = ""  # empty: Weights & Biases off
    progress_bar: bool = True
    log_every: int = 1

    def __post_init__(self) -> None:
        check(self.log_every >= 1, f"logging.log_every must be >= 1, got {self.log_every}")
