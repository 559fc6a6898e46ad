"""Data section: which prompts, how they are rendered, how many per step."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import check


ARITHMETIC_OPERATORS = "+-*"


@dataclass(kw_only=True, slots=True)
class SyntheticTaskConfig:
    """The synthetic arithmetic task (`megatron_s2lpo.data.synthetic`), used when
    `data.train_path` is empty.

    Operands are integers in [0, 10**num_digits); `*` binds tighter than `+`/`-` and results may
    be negative. Held-out membership is a hash of the expression, so the splits never overlap.
    """

    num_digits: int = 1
    num_terms: int = 2
    operators: str = "+-"
    heldout_fraction: float = 0.1
    seed: int = 0
    template: str = "arithmetic"  # checked against data.templates when prompts are made
    num_train: int = 512
    num_eval: int = 64

    def __post_init__(self) -> None:
        check(1 <= self.num_digits <= 6, f"data.synthetic.num_digits must be in [1, 6], got {self.num_digits}")
        check(2 <= self.num_terms <= 8, f"data.synthetic.num_terms must be in [2, 8], got {self.num_terms}")
        check(bool(self.operators) and all(op in ARITHMETIC_OPERATORS for op in self.operators),
              f"data.synthetic.operators must be a non-empty string of characters from "
              f"{ARITHMETIC_OPERATORS!r}, got {self.operators!r}")
        check(len(set(self.operators)) == len(self.operators),
              f"data.synthetic.operators {self.operators!r} repeats a character; list each operator once")
        check(0.0 < self.heldout_fraction < 1.0,
              f"data.synthetic.heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        check(self.num_train >= 1, f"data.synthetic.num_train must be >= 1, got {self.num_train}")
        check(self.num_eval >= 0, f"data.synthetic.num_eval must be >= 0, got {self.num_eval}")


@dataclass(kw_only=True, slots=True)
class DataConfig:
    train_path: str = ""  # jsonl or parquet; empty means the synthetic task
    eval_paths: list[str] = field(default_factory=list)
    schema: str = "auto"  # dapo | math | commonsenseqa | auto (detected per file)
    template: str = ""  # prompt template name (data.templates); "" = the schema's default
    prompts_per_step: int = 8
    shuffle: bool = True
    seed: int = 1234
    max_prompt_tokens: int = 1024  # longer prompts are skipped with a warning
    # Drop rows whose problem and answer repeat an earlier row of the same file (DAPO-Math-17k's
    # parquet repeats each problem many times); false: a repeated prompt id is an error.
    dedupe: bool = True
    synthetic: SyntheticTaskConfig = field(default_factory=SyntheticTaskConfig)

    def __post_init__(self) -> None:
        check(self.prompts_per_step >= 1,
              f"data.prompts_per_step must be >= 1, got {self.prompts_per_step}")
        check(self.max_prompt_tokens >= 1,
              f"data.max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
