"""Prompt datasets, base-model templates, the synthetic arithmetic task and the prompt sampler.

`build_synthetic_tokenizer` is imported lazily: it pulls in transformers, which the readers and
the sampler do not need.
"""

from megatron_s2lpo.data.readers import SCHEMAS, iter_rows, load_prompts
from megatron_s2lpo.data.sampler import PromptSampler
from megatron_s2lpo.data.synthetic import SyntheticTaskConfig, arithmetic_completion, make_arithmetic_prompts
from megatron_s2lpo.data.templates import TEMPLATES, PromptTemplate, get_template, render_chat, tokenize_prompts

__all__ = [
    "SCHEMAS",
    "TEMPLATES",
    "SyntheticTaskConfig",
    "PromptSampler",
    "PromptTemplate",
    "arithmetic_completion",
    "build_synthetic_tokenizer",
    "get_template",
    "iter_rows",
    "load_prompts",
    "make_arithmetic_prompts",
    "render_chat",
    "tokenize_prompts",
]


def __getattr__(name: str):
    if name == "build_synthetic_tokenizer":
        from megatron_s2lpo.data.tokenizer import build_synthetic_tokenizer

        return build_synthetic_tokenizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
