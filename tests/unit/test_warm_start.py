"""Warm starts of models built from code: `rollout.<name>.init_sft_problems` limits the
supervised steps to the first N synthetic train problems (the RL run trains on all of them)."""

from __future__ import annotations

import os

import pytest

from megatron_s2lpo.config import load_config
from megatron_s2lpo.data import build_synthetic_tokenizer, make_arithmetic_prompts
from megatron_s2lpo.trainer.build import materialize_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "examples", "tiny_cpu.yaml")


class RecordingTokenizer:
    """The synthetic tokenizer, remembering every text the warm start encodes."""

    def __init__(self) -> None:
        self._inner = build_synthetic_tokenizer()
        self.texts: list[str] = []

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def encode(self, text, *args, **kwargs):
        self.texts.append(text)
        return self._inner.encode(text, *args, **kwargs)


def warm_start_prompts(tmp_path, num_problems: int) -> tuple[set[str], list[str]]:
    cfg = load_config(TINY, [f"run.output_dir={tmp_path}", "rollout.explorer.init_sft_steps=3",
                             f"rollout.explorer.init_sft_problems={num_problems}"])
    tokenizer = RecordingTokenizer()
    materialize_model(cfg.rollout.explorer, "explorer", cfg, tokenizer)
    train = make_arithmetic_prompts(cfg.data.synthetic, split="train", num_prompts=cfg.data.synthetic.num_train)
    return {t for t in tokenizer.texts if t.endswith("=")}, [p.text for p in train]


def test_warm_start_sees_only_the_first_problems(tmp_path):
    seen, train = warm_start_prompts(tmp_path / "subset", 5)
    assert seen and seen <= set(train[:5])  # 3 steps x 32 picks from 5 problems
    seen_all, _ = warm_start_prompts(tmp_path / "all", 0)
    assert len(seen_all - set(train[:5])) > 20  # 0: the whole train split


def test_more_warm_start_problems_than_train_problems_is_refused(tmp_path):
    cfg = load_config(TINY, [f"run.output_dir={tmp_path}", "rollout.learner.init_sft_problems=151"])
    with pytest.raises(ValueError, match=r"rollout.learner.init_sft_problems=151 exceeds data.synthetic.num_train=150"):
        materialize_model(cfg.rollout.learner, "learner", cfg, build_synthetic_tokenizer())
    assert not os.path.exists(os.path.join(tmp_path, "models", "learner"))
    with pytest.raises(ValueError, match="init_sft_problems must be >= 0"):
        load_config(TINY, ["rollout.learner.init_sft_problems=-1"])
