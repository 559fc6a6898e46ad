"""Prompt templates for BASE models (no chat, no thinking mode).

A template turns a bare problem into the text the model continues. Base models follow a plain
"Question: ...\\nAnswer:" completion prompt well, and the `\\boxed{}` instruction is what the
math-verify reward looks for. Templates substitute with `str.replace`, not `str.format`, because
problems are full of LaTeX braces.

Chat templates are opt-in: `render_chat` wraps a rendered prompt with a Hugging Face tokenizer's
chat template when (and only when) the tokenizer has one.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_s2lpo.types import Prompt

PLACEHOLDER = "{problem}"


@dataclass(kw_only=True, slots=True, frozen=True)
class PromptTemplate:
    """A completion prompt with exactly one `{problem}` placeholder."""

    name: str
    text: str

    def __post_init__(self) -> None:
        count = self.text.count(PLACEHOLDER)
        if count != 1:
            raise ValueError(
                f"template {self.name!r} must contain {PLACEHOLDER} exactly once, found it {count} times"
            )

    def render(self, problem: str) -> str:
        return self.text.replace(PLACEHOLDER, problem)


BOXED = PromptTemplate(
    name="boxed",
    text="Question: {problem}\nPlease reason step by step, and put your final answer within \\boxed{}.\nAnswer:",
)
MULTIPLE_CHOICE = PromptTemplate(
    name="multiple_choice",
    text=(
        "Question: {problem}\nPlease reason step by step, and put the letter of the correct choice "
        "within \\boxed{}.\nAnswer:"
    ),
)
# The problem already is the whole prompt (e.g. a DAPO row whose instruction could not be
# stripped exactly, or a pre-rendered dataset).
PASSTHROUGH = PromptTemplate(name="passthrough", text=PLACEHOLDER)
# DAPO-Math-17k's own instruction (answer on an "Answer:" line instead of in \boxed{}); applying it
# to a stripped DAPO problem gives back the original user message byte for byte.
DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the "
    "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'
DAPO = PromptTemplate(name="dapo", text=DAPO_PREFIX + PLACEHOLDER + DAPO_SUFFIX)
# The synthetic arithmetic task: "12+7=" -> the model writes "\boxed{19}".
ARITHMETIC = PromptTemplate(name="arithmetic", text="{problem}=")

TEMPLATES: dict[str, PromptTemplate] = {
    t.name: t for t in (BOXED, MULTIPLE_CHOICE, PASSTHROUGH, DAPO, ARITHMETIC)
}


def get_template(template: str | PromptTemplate) -> PromptTemplate:
    """Look a template up by name (or pass a `PromptTemplate` through)."""
    if isinstance(template, PromptTemplate):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {sorted(TEMPLATES)} or pass a PromptTemplate")
    return TEMPLATES[template]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(text: str, tokenizer, *, required: bool = False) -> str:
    """Wrap `text` as one user turn with the tokenizer's chat template, ready for generation.

    Tokenizers without a chat template (base models, the synthetic tokenizer) return `text`
    unchanged, unless `required=True`, which makes that a ValueError.
    """
    if not has_chat_template(tokenizer):
        if required:
            raise ValueError(
                f"{type(tokenizer).__name__} has no chat_template; use a plain template or a chat tokenizer"
            )
        return text
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def tokenize_prompts(prompts: list[Prompt], tokenizer, *, add_special_tokens: bool = True) -> list[Prompt]:
    """Fill `Prompt.token_ids` in place from `Prompt.text`; returns the same list.

    `add_special_tokens=True` follows the tokenizer's own convention (Llama adds a BOS, Qwen adds
    nothing); pass False for text already rendered with a chat template, which contains its own.
    """
    for prompt in prompts:
        prompt.token_ids = list(tokenizer.encode(prompt.text, add_special_tokens=add_special_tokens))
    return prompts
