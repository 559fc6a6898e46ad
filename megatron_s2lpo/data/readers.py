"""Prompt datasets from `.jsonl` and `.parquet` files.

Three row schemas, detected from the first row of a file or named explicitly:

- `dapo` (DAPO-Math-17k): `prompt` is a chat list `[{"role": "user", "content": ...}]`, the answer
  is `reward_model.ground_truth`; optional `data_source` and `extra_info.index`. DAPO's user
  message wraps the problem in its own instruction (`templates.DAPO_PREFIX` ... `DAPO_SUFFIX`).
  When both match EXACTLY they are stripped and the bare problem goes through the chosen
  template (default `boxed`); otherwise the message is kept whole and, unless a template is
  given explicitly, passed through untouched (it already is a complete prompt).
  `metadata["instruction_stripped"]` records which happened.
- `math` (alias `aime`; MATH, MATH-500, AIME): `problem` or `question`, plus `answer`, or else
  `solution` whose last `\\boxed{...}` is the answer. Ids from `unique_id` or `id`.
- `commonsenseqa` (alias `csqa`): `question` is a string or the original `{"stem", "choices":
  [{"label", "text"}]}` object; HF-style rows carry `choices: {"label": [...], "text": [...]}`.
  `answerKey` is the ground-truth letter; choices are rendered into the problem as "A. text" lines.

Row numbers in messages are 1-based: the line number for jsonl, the record index for parquet.
`prompt_id` is `<prefix>:<dataset id>` when the row has an id, else `<prefix>:<row>`, with the
file stem as the default prefix.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_s2lpo.data import templates
from megatron_s2lpo.types import Prompt
from megatron_s2lpo.utils.boxed import extract_last_boxed

PARQUET_BATCH_ROWS = 1024


class RowError(ValueError):
    """A row lacks a field or has it in the wrong form; the reader adds the file and row."""

    def __init__(self, field_name: str, problem: str, expected: str) -> None:
        super().__init__(f"field {field_name!r} {problem}; expected {expected}")
        self.field_name = field_name


@dataclass(kw_only=True, slots=True)
class ParsedRow:
    problem: str
    ground_truth: str
    row_id: str | None = None  # the dataset's own id, if it has one
    data_source: str | None = None
    complete_prompt: bool = False  # the problem already carries its own instruction
    metadata: dict = field(default_factory=dict)


@dataclass(kw_only=True, slots=True, frozen=True)
class Schema:
    name: str
    parse_row: Callable[[dict], ParsedRow]
    default_template: str
    description: str  # the fields it needs, for error messages


# ---------------------------------------------------------------------------------------------
# field helpers


def _get(row: dict, key: str, expected: str, prefix: str = "") -> Any:
    value = row.get(key) if isinstance(row, dict) else None
    if value is None:
        raise RowError(prefix + key, "is missing", expected)
    return value


def _text(value: Any, name: str, expected: str = "a non-empty string") -> str:
    if not isinstance(value, str):
        raise RowError(name, f"has type {type(value).__name__}", expected)
    if not value.strip():
        raise RowError(name, "is empty", expected)
    return value


def _answer(value: Any, name: str) -> str:
    """Ground truths may be stored as integers (AIME); bools and floats are ambiguous."""
    expected = "a non-empty string or an integer"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return _text(value, name, expected).strip()


def _optional_id(value: Any) -> str | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (str, int)) and str(value).strip():
        return str(value).strip()
    return None


# ---------------------------------------------------------------------------------------------
# row parsers


def strip_dapo_instruction(content: str) -> str | None:
    """The bare problem inside a DAPO user message, or None when the wrapper does not match exactly."""
    prefix, suffix = templates.DAPO_PREFIX, templates.DAPO_SUFFIX
    if content.startswith(prefix) and content.endswith(suffix) and len(content) > len(prefix) + len(suffix):
        return content[len(prefix) : -len(suffix)]
    return None


def parse_dapo_row(row: dict) -> ParsedRow:
    chat_expected = 'a chat list [{"role": "user", "content": "..."}] with one user message'
    messages = _get(row, "prompt", chat_expected)
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise RowError("prompt", f"has type {type(messages).__name__}", chat_expected)
    user = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if len(user) != 1:
        raise RowError("prompt", f"has {len(user)} user messages", chat_expected)
    content = _text(messages[user[0]].get("content"), f"prompt[{user[0]}].content")
    reward_model = _get(row, "reward_model", 'an object {"ground_truth": ...}')
    if not isinstance(reward_model, dict):
        raise RowError("reward_model", f"has type {type(reward_model).__name__}", 'an object {"ground_truth": ...}')
    ground_truth = _answer(
        _get(reward_model, "ground_truth", "a non-empty string or an integer", "reward_model."),
        "reward_model.ground_truth",
    )
    extra_info = row.get("extra_info")
    row_id = _optional_id(extra_info.get("index")) if isinstance(extra_info, dict) else None
    source = row.get("data_source")
    problem = strip_dapo_instruction(content)
    return ParsedRow(
        problem=content if problem is None else problem,
        ground_truth=ground_truth,
        row_id=row_id,
        data_source=source if isinstance(source, str) and source else None,
        complete_prompt=problem is None,
        metadata={"instruction_stripped": problem is not None},
    )


def parse_math_row(row: dict) -> ParsedRow:
    key = "problem" if row.get("problem") is not None else "question"
    problem = _text(_get(row, key, "a problem statement in 'problem' or 'question'"), key)
    if row.get("answer") is not None:
        ground_truth = _answer(row["answer"], "answer")
    elif row.get("solution") is not None:
        solution = _text(row["solution"], "solution")
        boxed = extract_last_boxed(solution)
        if boxed is None or not boxed.strip():
            expected = "an 'answer' field or a solution ending in \\boxed{answer}"
            raise RowError("solution", "has no non-empty \\boxed{...} answer", expected)
        ground_truth = boxed.strip()
    else:
        raise RowError("answer", "is missing", "'answer', or a 'solution' ending in \\boxed{answer}")
    row_id = _optional_id(row.get("unique_id")) or _optional_id(row.get("id"))
    source = row.get("data_source")
    return ParsedRow(
        problem=problem,
        ground_truth=ground_truth,
        row_id=row_id,
        data_source=source if isinstance(source, str) and source else None,
    )


def _csqa_choices(choices: Any, name: str) -> list[tuple[str, str]]:
    """Both layouts: [{"label", "text"}, ...] (original) and {"label": [...], "text": [...]} (HF)."""
    expected = 'a list of {"label", "text"} objects or {"label": [...], "text": [...]}'
    if isinstance(choices, dict):
        labels, texts = choices.get("label"), choices.get("text")
        if not isinstance(labels, list) or not isinstance(texts, list) or len(labels) != len(texts):
            raise RowError(name, "has mismatched or missing 'label'/'text' lists", expected)
        pairs = list(zip(labels, texts))
    elif isinstance(choices, list):
        if not all(isinstance(c, dict) for c in choices):
            raise RowError(name, "has a non-object entry", expected)
        pairs = [(c.get("label"), c.get("text")) for c in choices]
    else:
        raise RowError(name, f"has type {type(choices).__name__}", expected)
    if not pairs:
        raise RowError(name, "is empty", expected)
    for i, (label, text) in enumerate(pairs):
        _text(label, f"{name}[{i}].label")
        _text(text, f"{name}[{i}].text")
    return [(label.strip(), text.strip()) for label, text in pairs]


def parse_commonsenseqa_row(row: dict) -> ParsedRow:
    question = _get(row, "question", 'a string, or {"stem": ..., "choices": [...]}')
    if isinstance(question, dict):
        stem = _text(question.get("stem"), "question.stem")
        choices = _csqa_choices(_get(question, "choices", "the answer choices", "question."), "question.choices")
    else:
        stem = _text(question, "question", 'a string, or {"stem": ..., "choices": [...]}')
        choices = _csqa_choices(_get(row, "choices", "the answer choices"), "choices")
    labels = [label for label, _ in choices]
    answer_key = _get(row, "answerKey", f"one of the choice labels {labels}")
    answer = _text(answer_key, "answerKey", f"one of {labels}").strip()
    if answer not in labels:
        raise RowError("answerKey", f"is {answer!r}, not a choice label", f"one of {labels}")
    problem = stem.strip() + "\n" + "\n".join(f"{label}. {text}" for label, text in choices)
    return ParsedRow(problem=problem, ground_truth=answer, row_id=_optional_id(row.get("id")))


_DAPO = Schema(
    name="dapo",
    parse_row=parse_dapo_row,
    default_template="boxed",
    description="dapo: prompt (chat list) + reward_model.ground_truth",
)
_MATH = Schema(
    name="math",
    parse_row=parse_math_row,
    default_template="boxed",
    description="math/aime: problem|question + answer|solution",
)
_CSQA = Schema(
    name="commonsenseqa",
    parse_row=parse_commonsenseqa_row,
    default_template="multiple_choice",
    description="commonsenseqa: question (+ choices) + answerKey",
)
SCHEMAS: dict[str, Schema] = {"dapo": _DAPO, "math": _MATH, "aime": _MATH, "commonsenseqa": _CSQA, "csqa": _CSQA}


def detect_schema(row: dict) -> Schema | None:
    """The schema a row's keys point to, or None."""
    if "prompt" in row and "reward_model" in row:
        return _DAPO
    if "answerKey" in row:
        return _CSQA
    if ("problem" in row or "question" in row) and ("answer" in row or "solution" in row):
        return _MATH
    return None


# ---------------------------------------------------------------------------------------------
# files


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open("rb") as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path}: row {line_number}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                    "JSON lines must be UTF-8: convert the file, e.g. `iconv -f latin1 -t utf-8`"
                ) from None
            if not line.strip():
                continue  # blank lines are skipped but still counted, so row = line number
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}: row {line_number}: invalid JSON ({e.msg} at column {e.colno}); "
                    "expected one JSON object per line"
                ) from None
            if not isinstance(row, dict):
                raise ValueError(
                    f"{path}: row {line_number}: a JSON {type(row).__name__}; expected one JSON object per line"
                )
            yield line_number, row


def _iter_parquet(path: Path) -> Iterator[tuple[int, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS)
        row_number = 0
        for batch in batches:
            for row in batch.to_pylist():  # structs -> dicts, lists of structs -> lists of dicts
                row_number += 1
                yield row_number, row
    except pa.ArrowException as e:
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None


READERS: dict[str, Callable[[Path], Iterator[tuple[int, dict]]]] = {
    ".jsonl": _iter_jsonl,
    ".parquet": _iter_parquet,
}


def iter_rows(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(1-based row number, row dict) for every record of a .jsonl or .parquet file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; expected one of {sorted(READERS)}")
    return reader(path)


def _resolve_schema(schema: str, path: Path, row_number: int, row: dict) -> Schema:
    if schema != "auto":
        if schema not in SCHEMAS:
            raise ValueError(f"unknown schema {schema!r}; choose 'auto' or one of {sorted(SCHEMAS)}")
        return SCHEMAS[schema]
    detected = detect_schema(row)
    if detected is None:
        expected = "; ".join(s.description for s in (_DAPO, _MATH, _CSQA))
        raise ValueError(
            f"{path}: row {row_number}: cannot detect the schema from fields {sorted(row)}; "
            f"expected one of [{expected}], or pass schema= explicitly"
        )
    return detected


def load_prompts(
    path: str | Path,
    schema: str = "auto",
    template: str | templates.PromptTemplate | None = None,
    limit: int | None = None,
    *,
    dedupe: bool = False,
    id_prefix: str | None = None,
) -> list[Prompt]:
    """Read a prompt file into `Prompt`s with the template applied.

    schema: "auto" (detected from the first row) or a key of `SCHEMAS`.
    template: a name in `templates.TEMPLATES` or a `PromptTemplate`; None uses the schema's default
        (and passes DAPO messages whose instruction could not be stripped through untouched).
    limit: keep at most this many prompts (read stops early).
    dedupe: drop rows whose problem and ground truth repeat an earlier row (DAPO-Math-17k's
        published parquet repeats each problem many times). Otherwise a repeated prompt_id is an error.
    id_prefix: prefix of every prompt_id; the file stem by default.
    """
    path = Path(path)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    chosen = None if template is None else templates.get_template(template)
    prefix = path.stem if id_prefix is None else id_prefix
    prompts: list[Prompt] = []
    first_row_of: dict[str, int] = {}
    seen_content: set[tuple[str, str]] = set()
    resolved: Schema | None = None
    for row_number, row in iter_rows(path):
        if resolved is None:
            resolved = _resolve_schema(schema, path, row_number, row)
        if limit is not None and len(prompts) >= limit:
            break
        try:
            parsed = resolved.parse_row(row)
        except RowError as e:
            raise ValueError(f"{path}: row {row_number} ({resolved.name} schema): {e}") from None
        if dedupe:
            key = (parsed.problem, parsed.ground_truth)
            if key in seen_content:
                continue
            seen_content.add(key)
        prompt_id = f"{prefix}:{parsed.row_id if parsed.row_id is not None else row_number}"
        if prompt_id in first_row_of:
            raise ValueError(
                f"{path}: row {row_number}: prompt_id {prompt_id!r} repeats row {first_row_of[prompt_id]}; "
                + ("give rows unique ids (rows with the same problem and answer are already dropped)" if dedupe
                   else "set data.dedupe=true (load_prompts(dedupe=True)) to drop repeated problems, or give rows "
                   "unique ids")
            )
        first_row_of[prompt_id] = row_number
        if chosen is not None:
            rendered = chosen.render(parsed.problem)
        elif parsed.complete_prompt:
            rendered = parsed.problem
        else:
            rendered = templates.get_template(resolved.default_template).render(parsed.problem)
        metadata = {"problem": parsed.problem, "row": row_number, "file": str(path), "schema": resolved.name}
        metadata.update(parsed.metadata)
        prompts.append(
            Prompt(
                prompt_id=prompt_id,
                text=rendered,
                ground_truth=parsed.ground_truth,
                data_source=parsed.data_source or path.stem,
                metadata=metadata,
            )
        )
    if resolved is None:
        raise ValueError(f"{path}: the file has no rows; expected at least one record")
    return prompts
