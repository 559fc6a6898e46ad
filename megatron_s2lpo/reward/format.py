r"""Format rewards: pure string functions, no math-verify, no processes.

The final answer of a completion is found by `megatron_s2lpo.utils.boxed.extract_last_boxed`
(re-exported here), the one extractor that `math.py` and the dataset readers also use.
"""

from __future__ import annotations

import re

from megatron_s2lpo.utils.boxed import count_boxes, extract_last_boxed, last_box

CHOICE_LETTERS = "ABCDE"
# "answer is (B)", "Answer: C", "the answer is B." -- the letter must be a capital standing alone,
# so "the answer is a bird" does not read as choice A.
_ANSWER_IS = re.compile(r"(?i:answer)(?:\s+is)?\s*[:：]?\s*[(\[]?\s*([A-E])(?![A-Za-z0-9])")
_LEADING_CHOICE = re.compile(r"[\s(\[]*([A-E])(?![A-Za-z0-9])")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textrm)\s*\{([^{}]*)\}")


def boxed_format_reward(completion: str, ground_truth: str | None = None) -> float:
    r"""1.0 if the completion holds exactly one closed, non-empty box, else 0.0.

    `ground_truth` is ignored: the signature matches the other rewards so the registry can hold it.

    >>> boxed_format_reward(r"The answer is $\boxed{42}$.")
    1.0
    >>> boxed_format_reward(r"\boxed{1} or maybe \boxed{2}")
    0.0
    >>> boxed_format_reward(r"\boxed{}")
    0.0
    >>> boxed_format_reward(r"\boxed{\frac{1}{2}")
    0.0
    """
    if count_boxes(completion) != 1:
        return 0.0
    content = extract_last_boxed(completion)
    return 1.0 if content is not None and content.strip() else 0.0


def _normalize_choice_truth(ground_truth: str) -> str:
    letter = ground_truth.strip().strip("()[]").strip().upper()
    if len(letter) != 1 or letter not in CHOICE_LETTERS:
        raise ValueError(
            f"choice_reward: ground truth {ground_truth!r} is not one of the letters "
            f"{', '.join(CHOICE_LETTERS)}; give the correct option's letter (e.g. 'B')"
        )
    return letter


def extract_choice(completion: str) -> str | None:
    r"""The option letter (A-E) a completion settles on, or None.

    Candidates are the last closed box (its leading letter, `\text{}` unwrapped) and the last
    "answer is (X)" / "Answer: X" phrase; the one later in the text wins.

    >>> extract_choice(r"Hence \boxed{\text{(C)}}")
    'C'
    >>> extract_choice("I think B fits. So the answer is (D).")
    'D'
    >>> extract_choice(r"\boxed{Bob}") is None
    True
    """
    candidates: list[tuple[int, str]] = []
    box = last_box(completion)
    if box is not None and box[1] is not None:
        content = _TEXT_WRAPPER.sub(r"\1", box[1])
        match = _LEADING_CHOICE.match(content)
        if match:
            candidates.append((box[0], match.group(1)))
    phrase = None
    for phrase in _ANSWER_IS.finditer(completion):
        pass
    if phrase is not None:
        candidates.append((phrase.start(), phrase.group(1)))
    return max(candidates)[1] if candidates else None


def choice_reward(completion: str, ground_truth: str) -> float:
    r"""1.0 if the completion's final option letter equals `ground_truth` (CommonsenseQA style).

    Raises ValueError when `ground_truth` is not a letter A-E (a dataset or config mistake).

    >>> choice_reward(r"... so the answer is \boxed{B}", "B")
    1.0
    >>> choice_reward("The answer is (A).", "(c)")
    0.0
    >>> choice_reward("I cannot decide.", "A")
    0.0
    """
    truth = _normalize_choice_truth(ground_truth)
    return 1.0 if extract_choice(completion) == truth else 0.0
