r"""Finding the final `\boxed{...}` answer in a text: shared by data/ (dataset solutions) and
reward/ (model completions).

Conventions:
- `\boxed` and `\fbox` are the box commands (`\boxedfoo` is not one);
- braces are balanced with escaped braces `\{ \}` skipped, so `\boxed{\{1,2\}}` gives `\{1,2\}`;
- the brace-less form `\boxed 5` takes everything up to the next `$` or newline, the convention of
  the MATH / Qwen-Math evaluation scripts, since models write `\boxed 12` meaning 12;
- the LAST box command wins (for `\boxed{\boxed{5}}` that is the inner one); when the last box
  is never closed (a truncated generation) there is no answer, even if an earlier box is complete.
"""

from __future__ import annotations

import re

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _box_argument(text: str, start: int) -> str | None:
    """Argument of the box command whose name ends at `start`; None if it is never closed."""
    pos = start
    while pos < len(text) and text[pos].isspace():
        pos += 1
    if pos == len(text):
        return None
    if text[pos] != "{":
        # Brace-less `\boxed 5`: up to the end of the math span or line.
        end = len(text)
        for stop in ("$", "\n"):
            found = text.find(stop, pos)
            if found != -1:
                end = min(end, found)
        argument = text[pos:end].strip()
        return argument or None
    depth = 0
    index = pos
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2  # an escaped character, `\{` and `\}` included, never counts
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[pos + 1 : index]
        index += 1
    return None


def last_box(text: str) -> tuple[int, str | None] | None:
    """(position, argument) of the last box command, argument None if unclosed; None if no box."""
    last = None
    for last in _BOX_COMMAND.finditer(text):
        pass
    if last is None:
        return None
    return last.start(), _box_argument(text, last.end())


def extract_last_boxed(text: str) -> str | None:
    r"""Content of the last `\boxed{...}` / `\fbox{...}` in `text`, or None.

    None when there is no box or the last one is never closed.

    >>> extract_last_boxed(r"so $x = \boxed{\frac{1}{2}}$.")
    '\\frac{1}{2}'
    >>> extract_last_boxed(r"first \boxed{1}, then \fbox{2}")
    '2'
    >>> extract_last_boxed(r"\boxed{\{1, 2\}}")
    '\\{1, 2\\}'
    >>> extract_last_boxed(r"$\boxed 5$")
    '5'
    >>> extract_last_boxed(r"\boxed{3} and then \boxed{4") is None
    True
    >>> extract_last_boxed("no box here") is None
    True
    """
    found = last_box(text)
    return None if found is None else found[1]


def count_boxes(text: str) -> int:
    r"""Number of box commands (`\boxed`, `\fbox`) in `text`.

    >>> count_boxes(r"\boxed{1} \fbox{2} \boxedfoo")
    2
    """
    return len(_BOX_COMMAND.findall(text))
