"""Prompt file readers (jsonl/parquet, DAPO/MATH/CommonsenseQA schemas) and templates."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_s2lpo.config import DataConfig
from megatron_s2lpo.data import templates
from megatron_s2lpo.data.readers import SCHEMAS, load_prompts, strip_dapo_instruction
from megatron_s2lpo.utils.boxed import extract_last_boxed

DAPO_CONTENT = templates.DAPO_PREFIX + "Find $x$ if $2x = 68$." + templates.DAPO_SUFFIX


def write_jsonl(path, rows, raw_lines=()):
    lines = [json.dumps(r) for r in rows] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def dapo_row(content=DAPO_CONTENT, ground_truth="34", index="a1b2"):
    return {
        "data_source": "math_dapo",
        "prompt": [{"role": "user", "content": content}],
        "ability": "MATH",
        "reward_model": {"ground_truth": ground_truth, "style": "rule-math"},
        "extra_info": {"index": index},
    }


# ----------------------------------------------------------------------------------------------
# DAPO


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_dapo_rows_strip_instruction_and_apply_boxed_template(tmp_path, suffix):
    rows = [dapo_row(), dapo_row(content=DAPO_CONTENT.replace("68", "70"), ground_truth="35", index="c3")]
    path = tmp_path / f"dapo{suffix}"
    write_jsonl(path, rows) if suffix == ".jsonl" else write_parquet(path, rows)
    if suffix == ".parquet":  # the real file stores these as nested structs
        schema = pq.read_schema(path)
        assert pa.types.is_struct(schema.field("reward_model").type)
        assert pa.types.is_list(schema.field("prompt").type)
    prompts = load_prompts(path)
    assert [p.prompt_id for p in prompts] == ["dapo:a1b2", "dapo:c3"]
    assert [p.ground_truth for p in prompts] == ["34", "35"]
    assert prompts[0].data_source == "math_dapo"
    assert prompts[0].metadata["problem"] == "Find $x$ if $2x = 68$."
    assert prompts[0].metadata["instruction_stripped"] is True
    assert prompts[0].metadata["schema"] == "dapo" and prompts[0].metadata["row"] == 1
    assert prompts[0].text == templates.BOXED.render("Find $x$ if $2x = 68$.")
    assert "\\boxed{}" in prompts[0].text and "Answer:" not in prompts[0].text.split("\n")[0]


def test_dapo_template_restores_the_original_message(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [dapo_row()])
    (prompt,) = load_prompts(path, template="dapo")
    assert prompt.text == DAPO_CONTENT
    assert strip_dapo_instruction(DAPO_CONTENT) == "Find $x$ if $2x = 68$."


def test_dapo_message_without_exact_wrapper_passes_through(tmp_path):
    near_miss = DAPO_CONTENT.replace("Remember to put", "Remember to place")  # suffix differs
    path = write_jsonl(tmp_path / "d.jsonl", [dapo_row(content=near_miss)])
    (prompt,) = load_prompts(path)
    assert prompt.text == near_miss
    assert prompt.metadata["instruction_stripped"] is False
    # An explicit template still applies, to the whole message.
    (boxed,) = load_prompts(path, template="boxed")
    assert boxed.text == templates.BOXED.render(near_miss)


def test_dapo_integer_ground_truth_and_missing_optional_fields(tmp_path):
    row = {"prompt": [{"role": "user", "content": "What is 1+1?"}], "reward_model": {"ground_truth": 2}}
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    (prompt,) = load_prompts(path)
    assert prompt.ground_truth == "2"
    assert prompt.prompt_id == "d:1"
    assert prompt.data_source == "d"  # the file stem when the row has no data_source


# ----------------------------------------------------------------------------------------------
# MATH / AIME


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_math_and_aime_rows(tmp_path, suffix):
    rows = [
        {"problem": "Compute $1+1$.", "answer": "2", "unique_id": "test/algebra/1.json", "solution": "x"},
        {"problem": "Half of one?", "answer": None, "unique_id": None,
         "solution": "It is $\\boxed{\\frac{1}{2}}$, not $\\boxed{3}$... so $\\boxed{\\frac{1}{2}}$."},
    ]
    path = tmp_path / f"math500{suffix}"
    write_jsonl(path, rows) if suffix == ".jsonl" else write_parquet(path, rows)
    prompts = load_prompts(path)
    assert [p.ground_truth for p in prompts] == ["2", "\\frac{1}{2}"]
    assert [p.prompt_id for p in prompts] == ["math500:test/algebra/1.json", "math500:2"]
    assert prompts[0].text == templates.BOXED.render("Compute $1+1$.")
    assert prompts[0].metadata["schema"] == "math"


def test_aime_question_with_integer_answer_and_id(tmp_path):
    path = write_jsonl(tmp_path / "aime25.jsonl", [{"id": 7, "question": "Find N.", "answer": 204}])
    (prompt,) = load_prompts(path, schema="aime", template="passthrough")
    assert (prompt.prompt_id, prompt.text, prompt.ground_truth) == ("aime25:7", "Find N.", "204")


def test_math_solution_without_box_names_field(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"problem": "p", "solution": "the answer is 3"}])
    with pytest.raises(ValueError) as info:
        load_prompts(path)
    message = str(info.value)
    assert str(path) in message and "row 1" in message and "'solution'" in message and "\\boxed" in message


@pytest.mark.parametrize(
    "text, expected",
    [
        ("\\boxed{1}", "1"),
        ("a \\boxed{1} b \\boxed{\\frac{2}{3}} c", "\\frac{2}{3}"),
        ("\\boxed{{a}{b}}", "{a}{b}"),
        ("\\boxed{5} then truncated \\boxed{6", None),  # an unclosed last box is no answer
        ("\\fbox{7}", "7"),
        ("no box here", None),
        ("\\boxed{}", ""),
    ],
)
def test_last_boxed(text, expected):
    assert extract_last_boxed(text) == expected


# ----------------------------------------------------------------------------------------------
# CommonsenseQA


CHOICES = [{"label": "A", "text": "bank"}, {"label": "B", "text": "library"}, {"label": "C", "text": "park"}]
EXPECTED_PROBLEM = "Where are books lent?\nA. bank\nB. library\nC. park"


def test_commonsenseqa_original_layout(tmp_path):
    question = {"question_concept": "x", "choices": CHOICES, "stem": "Where are books lent?"}
    row = {"answerKey": "B", "id": "q1", "question": question}
    path = write_jsonl(tmp_path / "csqa.jsonl", [row])
    (prompt,) = load_prompts(path)
    assert prompt.ground_truth == "B" and prompt.prompt_id == "csqa:q1"
    assert prompt.metadata["problem"] == EXPECTED_PROBLEM
    assert prompt.text == templates.MULTIPLE_CHOICE.render(EXPECTED_PROBLEM)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_commonsenseqa_hf_layout(tmp_path, suffix):
    row = {"id": "q2", "question": "Where are books lent?", "question_concept": "x",
           "choices": {"label": ["A", "B", "C"], "text": ["bank", "library", "park"]}, "answerKey": "B"}
    path = tmp_path / f"train{suffix}"
    write_jsonl(path, [row]) if suffix == ".jsonl" else write_parquet(path, [row])
    (prompt,) = load_prompts(path, id_prefix="csqa")
    assert (prompt.prompt_id, prompt.ground_truth) == ("csqa:q2", "B")
    assert prompt.metadata["problem"] == EXPECTED_PROBLEM


def test_commonsenseqa_answer_key_not_a_label(tmp_path):
    row = {"question": "q?", "choices": {"label": ["A", "B"], "text": ["x", "y"]}, "answerKey": ""}
    good = {"question": "q?", "choices": {"label": ["A", "B"], "text": ["x", "y"]}, "answerKey": "A"}
    path = write_jsonl(tmp_path / "c.jsonl", [good, row])
    with pytest.raises(ValueError, match=r"row 2 \(commonsenseqa schema\): field 'answerKey' is empty"):
        load_prompts(path)
    path = write_jsonl(tmp_path / "c.jsonl", [good, {**row, "answerKey": "D"}])
    with pytest.raises(ValueError, match=r"field 'answerKey' is 'D', not a choice label; expected one of \['A', 'B'\]"):
        load_prompts(path)


# ----------------------------------------------------------------------------------------------
# errors


def test_missing_field_names_file_row_and_field(tmp_path):
    bad = dapo_row()
    del bad["reward_model"]["ground_truth"]
    path = write_parquet(tmp_path / "d.parquet", [dapo_row(), dapo_row(index="x2"), bad])
    with pytest.raises(ValueError) as info:
        load_prompts(path)
    message = str(info.value)
    assert message.startswith(f"{path}: row 3 (dapo schema): field 'reward_model.ground_truth' is missing")
    assert "expected a non-empty string or an integer" in message


def test_wrong_type_names_field(tmp_path):
    bad = {"prompt": "a plain string", "reward_model": {"ground_truth": "1"}}
    path = write_jsonl(tmp_path / "d.jsonl", [dapo_row(), bad])
    with pytest.raises(ValueError) as info:
        load_prompts(path)
    message = str(info.value)
    assert f"{path}: row 2" in message and "field 'prompt' has type str" in message
    assert "chat list" in message


def test_wrong_answer_type(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"problem": "p", "answer": 1.5}])
    with pytest.raises(ValueError, match=r"row 1 \(math schema\): field 'answer' has type float"):
        load_prompts(path)


def test_invalid_json_line_reports_line_number(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"problem": "p", "answer": "1"}], raw_lines=["", '{"problem": "q",'])
    with pytest.raises(ValueError) as info:
        load_prompts(path)
    message = str(info.value)
    assert message.startswith(f"{path}: row 3: invalid JSON")  # the blank line 2 still counts
    assert "one JSON object per line" in message


def test_non_object_json_line(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [[1, 2]])
    with pytest.raises(ValueError, match=r"row 1: a JSON list; expected one JSON object per line"):
        load_prompts(path)


def test_missing_file_and_unsupported_extension(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_prompts(missing)
    other = tmp_path / "x.csv"
    other.write_text("a,b\n")
    with pytest.raises(ValueError, match=r"unsupported file type '\.csv'"):
        load_prompts(other)


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "x.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="not a readable parquet file"):
        load_prompts(path)


def test_undetectable_schema_and_unknown_names(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": "hi", "label": 1}])
    with pytest.raises(ValueError, match=r"row 1: cannot detect the schema from fields \['label', 'text'\]"):
        load_prompts(path)
    with pytest.raises(ValueError, match="unknown schema 'gsm'"):
        load_prompts(path, schema="gsm")
    with pytest.raises(ValueError, match="unknown template 'chatml'"):
        load_prompts(path, schema="math", template="chatml")


def test_explicit_schema_overrides_detection(tmp_path):
    # A DAPO-looking row read as math fails on the math fields: the named schema is used.
    path = write_jsonl(tmp_path / "d.jsonl", [dapo_row()])
    with pytest.raises(ValueError, match=r"\(math schema\): field 'question' is missing"):
        load_prompts(path, schema="math")
    assert set(SCHEMAS) >= {"dapo", "math", "aime", "commonsenseqa"}


def test_empty_file(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text("\n\n")
    with pytest.raises(ValueError, match="no rows"):
        load_prompts(path)


# ----------------------------------------------------------------------------------------------
# limit, ids, dedupe


def test_limit_and_stable_ids(tmp_path):
    rows = [{"problem": f"p{i}", "answer": str(i)} for i in range(5)]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    assert [p.prompt_id for p in load_prompts(path, limit=3)] == ["m:1", "m:2", "m:3"]
    assert load_prompts(path, limit=0) == []
    assert [p.prompt_id for p in load_prompts(path)] == [p.prompt_id for p in load_prompts(path)]
    with pytest.raises(ValueError, match="limit must be >= 0"):
        load_prompts(path, limit=-1)


def test_repeated_id_is_an_error_unless_deduped(tmp_path):
    rows = [dapo_row(index="u1"), dapo_row(index="u2", ground_truth="9"), dapo_row(index="u1")]
    path = write_parquet(tmp_path / "d.parquet", rows)
    with pytest.raises(ValueError, match=r"row 3: prompt_id 'd:u1' repeats row 1; set data.dedupe=true") as err:
        load_prompts(path)
    field = str(err.value).split("set ")[1].split("=")[0]  # the hint names a real config field
    section, name = field.split(".")
    assert section == "data" and hasattr(DataConfig(), name) and DataConfig().dedupe is True
    prompts = load_prompts(path, dedupe=True)
    assert [p.prompt_id for p in prompts] == ["d:u1", "d:u2"]
    clash = write_parquet(tmp_path / "c.parquet", [dapo_row(index="u1"), dapo_row(index="u1", ground_truth="9")])
    with pytest.raises(ValueError, match="give rows unique ids"):  # same id, other content: dedupe cannot help
        load_prompts(clash, dedupe=True)


def test_a_file_that_is_not_utf8_names_the_file_and_row(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(json.dumps({"problem": "1+1", "answer": "2"}).encode() + b"\n"
                     + '{"problem": "caf\u00e9 = ?", "answer": "3"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.jsonl: row 2: not UTF-8 \(byte 0xe9 at column 17\)"):
        load_prompts(path)


# ----------------------------------------------------------------------------------------------
# templates


def test_template_registry_and_validation():
    assert templates.get_template("boxed") is templates.BOXED
    assert templates.get_template(templates.MULTIPLE_CHOICE) is templates.MULTIPLE_CHOICE
    with pytest.raises(ValueError, match="exactly once"):
        templates.PromptTemplate(name="bad", text="no placeholder")
    with pytest.raises(ValueError, match="exactly once"):
        templates.PromptTemplate(name="bad", text="{problem} {problem}")
    # LaTeX braces in the problem survive (str.format would choke on them).
    problem = "Let $f(x)=\\frac{1}{x}$ and {problem} stay literal."
    rendered = templates.BOXED.render(problem)
    assert rendered.startswith("Question: " + problem + "\n") and rendered.endswith("\\boxed{}.\nAnswer:")


def test_render_chat_only_with_a_chat_template():
    from megatron_s2lpo.data.tokenizer import build_synthetic_tokenizer

    tokenizer = build_synthetic_tokenizer()
    assert templates.render_chat("1+2=", tokenizer) == "1+2="
    with pytest.raises(ValueError, match="no chat_template"):
        templates.render_chat("1+2=", tokenizer, required=True)
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    assert templates.render_chat("1+2=", tokenizer) == "<user>1+2=\n<assistant>"


def test_tokenize_prompts_fills_token_ids(tmp_path):
    from megatron_s2lpo.data.tokenizer import build_synthetic_tokenizer

    tokenizer = build_synthetic_tokenizer()
    path = write_jsonl(tmp_path / "m.jsonl", [{"problem": "1+2", "answer": "3"}])
    prompts = templates.tokenize_prompts(load_prompts(path), tokenizer)
    assert prompts[0].token_ids == tokenizer.encode(prompts[0].text)
    assert tokenizer.decode(prompts[0].token_ids) == prompts[0].text
