"""Answer extraction, format and multiple-choice rewards, and the reward registry (no processes)."""

from __future__ import annotations

import doctest
import random
import re

import pytest

import megatron_s2lpo.reward as reward_pkg
from megatron_s2lpo.reward import format as reward_format
from megatron_s2lpo.reward import (
    REWARD_FUNCTIONS,
    boxed_format_reward,
    choice_reward,
    extract_choice,
    extract_last_boxed,
    get_reward_function,
)


def reference_last_boxed(text: str) -> str | None:
    """Slow reference: tokenize into LaTeX tokens, then match braces on the token list."""
    tokens = re.findall(r"\\[A-Za-z]+|\\.|.", text, flags=re.DOTALL)
    box_positions = [i for i, tok in enumerate(tokens) if tok in ("\\boxed", "\\fbox")]
    if not box_positions:
        return None
    i = box_positions[-1] + 1
    while i < len(tokens) and tokens[i].isspace():
        i += 1
    if i == len(tokens):
        return None
    if tokens[i] != "{":
        rest = "".join(tokens[i:])
        answer = re.split(r"[$\n]", rest)[0].strip()
        return answer or None
    depth = 0
    for j in range(i, len(tokens)):
        depth += {"{": 1, "}": -1}.get(tokens[j], 0)
        if depth == 0:
            return "".join(tokens[i + 1 : j])
    return None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so $x = \boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
        (r"\boxed{\frac{\sqrt{2}}{2}} done", r"\frac{\sqrt{2}}{2}"),
        (r"first \boxed{1}, then \fbox{2}", "2"),
        (r"\fbox{7}", "7"),
        (r"\boxed {5}", "5"),
        (r"$\boxed 5$", "5"),
        ("\\boxed 12 apples\nmore text", "12 apples"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\boxed{[0, 1)}", "[0, 1)"),
        (r"\boxed{a\\}", r"a\\"),  # `\\` is a line break, so the brace after it closes the box
        (r"\boxed{\boxed{5}}", "5"),  # the last box command is the inner one
        (r"\boxed{}", ""),
        (r"\boxed{3} and then \boxed{4", None),  # a truncated final box is no answer
        (r"\boxedfoo{1}", None),
        ("no box here", None),
        ("\\boxed", None),
        ("\\boxed $", None),
        ("", None),
    ],
)
def test_extract_last_boxed_cases(text: str, expected: str | None) -> None:
    assert extract_last_boxed(text) == expected
    assert reference_last_boxed(text) == expected  # keeps the reference honest too


def test_extract_last_boxed_matches_token_reference_on_random_strings() -> None:
    alphabet = ["\\boxed{", "\\boxed ", "\\fbox{", "{", "}", "\\{", "\\}", "\\\\", "\\frac", "$", "\n", " "]
    alphabet += ["a", "1"]
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        assert extract_last_boxed(text) == reference_last_boxed(text), text


def test_extract_last_boxed_pathological_inputs() -> None:
    assert extract_last_boxed("\\boxed{" + "{" * 100_000) is None
    assert extract_last_boxed("\\boxed{" + "{" * 5000 + "}" * 5000 + "}") == "{" * 5000 + "}" * 5000
    assert extract_last_boxed("x" * 100_000 + "\\boxed{1}") == "1"


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (r"The answer is $\boxed{42}$.", 1.0),
        (r"\fbox{x+1}", 1.0),
        (r"\boxed{1} or maybe \boxed{2}", 0.0),
        (r"\boxed{}", 0.0),
        (r"\boxed{  }", 0.0),
        (r"\boxed{\frac{1}{2}", 0.0),
        ("42", 0.0),
    ],
)
def test_boxed_format_reward(completion: str, expected: float) -> None:
    assert boxed_format_reward(completion) == expected
    assert boxed_format_reward(completion, "ignored") == expected


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (r"... so the answer is \boxed{B}", "B"),
        (r"\boxed{(C)}", "C"),
        (r"\boxed{\text{D}}", "D"),
        (r"\boxed{\textbf{(E)} river}", "E"),
        (r"\boxed{A. a bank}", "A"),
        ("Therefore, the answer is (C).", "C"),
        ("Answer: D", "D"),
        ("the answer is: [B]", "B"),
        (r"\boxed{A} ... on reflection the answer is (B).", "B"),  # the later one wins
        (r"The answer is (B). Final: \boxed{E}", "E"),
        ("the answer is a bird", None),  # a lowercase article is not choice A
        (r"\boxed{Bob}", None),
        (r"\boxed{F}", None),
        ("I cannot decide.", None),
    ],
)
def test_extract_choice(completion: str, expected: str | None) -> None:
    assert extract_choice(completion) == expected


def test_choice_reward_scores_against_normalised_truth() -> None:
    assert choice_reward(r"\boxed{B}", "B") == 1.0
    assert choice_reward(r"\boxed{B}", " (b) ") == 1.0
    assert choice_reward(r"\boxed{B}", "C") == 0.0
    assert choice_reward("no idea", "A") == 0.0


@pytest.mark.parametrize("bad_truth", ["F", "", "AB", "1", "(Z)"])
def test_choice_reward_rejects_invalid_truth(bad_truth: str) -> None:
    with pytest.raises(ValueError, match="not one of the letters A, B, C, D, E"):
        choice_reward(r"\boxed{A}", bad_truth)


def test_registry_names_and_bad_name() -> None:
    assert set(REWARD_FUNCTIONS) == {"math", "choice", "boxed_format"}
    assert get_reward_function("choice") is choice_reward
    assert get_reward_function("boxed_format") is boxed_format_reward
    with pytest.raises(ValueError, match="valid names: boxed_format, choice, math"):
        get_reward_function("accuracy")


@pytest.mark.parametrize("module", [reward_format, reward_pkg], ids=lambda m: m.__name__)
def test_docstring_examples(module) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
