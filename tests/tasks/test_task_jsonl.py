"""Tasks read from a user's JSONL file, and the messages for bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvpress_lab.errors import InputError
from kvpress_lab.tasks import generate_samples, score


def words(text: str) -> int:
    return len(text.split())


GOOD = {"context": "The vault code is 4411.", "question": "What is the code?", "answers": ["4411"]}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_reads_samples_with_defaults_and_options(tmp_path):
    full = {
        **GOOD,
        "answers": ["blue", "azure"],
        "answer_prefix": "The colour is",
        "metric": "string_match_all",
        "id": "colour-1",
    }
    path = write_lines(tmp_path / "data.jsonl", [json.dumps(GOOD), "", json.dumps(full)])
    first, second = generate_samples(str(path), 8000, 5, 0, words)
    assert first.context == GOOD["context"] and first.question == GOOD["question"]
    assert first.answers == ("4411",)
    assert first.metric == "string_match_part"  # the default for user data
    assert first.answer_prefix == ""
    assert first.sample_id == "data-1"
    assert first.task == "data"
    assert first.meta["target_tokens"] == 8000  # only recorded
    assert first.meta["context_tokens"] == 5
    assert second.answers == ("blue", "azure")
    assert second.answer_prefix == "The colour is"
    assert second.metric == "string_match_all"
    assert second.sample_id == "colour-1"
    assert second.meta["line"] == 3  # the blank line 2 is skipped but counted
    assert score(first, "It is 4411.") == 1.0
    assert score(second, "blue, not azure") == 1.0
    assert score(second, "blue") == 0.5


def test_takes_the_first_n_samples_and_accepts_a_path_object(tmp_path):
    lines = [json.dumps({**GOOD, "answers": [str(i)]}) for i in range(5)]
    path = write_lines(tmp_path / "many.jsonl", lines)
    samples = generate_samples(path, 100, 3, 0, words)
    assert [s.answers for s in samples] == [("0",), ("1",), ("2",)]
    assert len(generate_samples(path, 100, 50, 0, words)) == 5


def test_babilong_metric_with_labels(tmp_path):
    record = {**GOOD, "answers": ["kitchen"], "metric": "babilong", "labels": ["kitchen", "garden"]}
    path = write_lines(tmp_path / "b.jsonl", [json.dumps(record)])
    (s,) = generate_samples(str(path), 100, 1, 0, words)
    assert s.labels == ("kitchen", "garden")
    assert score(s, "kitchen.") == 1.0
    assert score(s, "kitchen or garden") == 0.0


def _error(tmp_path: Path, lines: list[str], name: str = "data.jsonl") -> str:
    path = write_lines(tmp_path / name, lines)
    with pytest.raises(InputError) as err:
        generate_samples(str(path), 1000, 10, 0, words)
    return str(err.value)


def test_missing_field_names_file_line_and_field(tmp_path):
    bad = {"context": "c", "question": "q"}
    message = _error(tmp_path, [json.dumps(GOOD), json.dumps(GOOD), json.dumps(bad)])
    assert message == (
        "data.jsonl line 3: missing field 'answers' (each line needs context, question and "
        "answers, or context and a questions list)"
    )
    message = _error(tmp_path, [json.dumps({"question": "q", "answers": ["a"]})])
    assert message.startswith("data.jsonl line 1: missing field 'context'")


def test_missing_field_past_n_samples_is_still_reported(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [json.dumps(GOOD), json.dumps({"context": "c"})])
    with pytest.raises(InputError, match="data.jsonl line 2: missing field 'question'"):
        generate_samples(str(path), 1000, 1, 0, words)


def test_invalid_json_names_file_and_line(tmp_path):
    message = _error(tmp_path, [json.dumps(GOOD), '{"context": "c", "question": '])
    assert message.startswith("data.jsonl line 2: invalid JSON")
    message = _error(tmp_path, ['["not", "an", "object"]'])
    assert message == "data.jsonl line 1: expected a JSON object, got list"


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("answers", "4411", "field 'answers' must be a list of strings, got str"),
        ("answers", [4411], "field 'answers' must be a list of strings, got a list holding int"),
        ("answers", [], "field 'answers' must hold at least one non-empty string"),
        ("context", 12, "field 'context' must be a string, got int"),
        ("question", None, "field 'question' must be a string, got NoneType"),
        ("answer_prefix", ["x"], "field 'answer_prefix' must be a string, got list"),
        ("labels", "kitchen", "field 'labels' must be a list of strings, got str"),
        ("metric", "bleu", "unknown metric 'bleu'"),
        ("question", "  ", "field 'question' is empty"),
    ],
)
def test_wrong_types_name_file_line_and_field(tmp_path, field, value, expected):
    record = {**GOOD, field: value}
    message = _error(tmp_path, [json.dumps(GOOD), "", json.dumps(record)])
    assert message.startswith("data.jsonl line 3: " + expected), message


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=r"empty\.jsonl' is empty"):
        generate_samples(str(path), 1000, 1, 0, words)


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "data.jsonl"
    with pytest.raises(InputError) as err:
        generate_samples(str(path), 1000, 1, 0, words)
    assert str(path) in str(err.value)
    assert "does not exist" in str(err.value)


MULTI = {
    "context": "Ada lives in Lisbon. The vault code is 4411.",
    "answer_prefix": "Answer:",
    "questions": [
        {"question": "Where does Ada live?", "answer": "Lisbon"},
        {"question": "What is the code?", "answers": ["4411", "four four one one"],
         "answer_prefix": "The code is"},
    ],
}  # fmt: skip


def test_a_questions_list_is_one_sample_with_several_questions(tmp_path):
    path = write_lines(tmp_path / "multi.jsonl", [json.dumps(MULTI), json.dumps(GOOD)])
    multi, single = generate_samples(str(path), 1000, 5, 0, words)
    assert multi.n_questions == 2 and single.n_questions == 1
    assert single.per_question() == [single]  # single-question samples are unchanged
    first, second = multi.per_question()
    assert (first.question, first.answers) == ("Where does Ada live?", ("Lisbon",))
    assert first.answer_prefix == "Answer:"  # the line's prefix where the item has none
    assert second.answers == ("4411", "four four one one")
    assert second.answer_prefix == "The code is"
    for i, q in enumerate((first, second)):
        assert q.context == MULTI["context"] and q.sample_id == "multi-1"
        assert q.meta["question_index"] == i and q.meta["n_questions"] == 2
        assert q.metric == "string_match_part" and q.n_questions == 1
    # the sample's own question is the first one
    assert (multi.question, multi.answers) == (first.question, first.answers)
    assert score(first, "Lisbon.") == 1.0 and score(second, "It is 4411") == 1.0
    assert score(second, "Lisbon") == 0.0


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"question": "q"}, "give either 'question' and 'answers' (one question) or 'questions'"),
        ({"questions": []}, "field 'questions' must be a non-empty list of objects like "
         '{"question": "...", "answers": ["..."]}, got an empty list'),
        ({"questions": {"question": "q"}}, "field 'questions' must be a non-empty list of "
         'objects like {"question": "...", "answers": ["..."]}, got dict'),
        ({"questions": ["Where?"]}, "questions[0]: expected an object like "
         '{"question": "...", "answers": ["..."]}, got str'),
        ({"questions": [{"answer": "x"}]}, "questions[0]: missing field 'question'; write each "
         'item as {"question": "...", "answers": ["..."]}'),
        ({"questions": [{"question": "q", "answer": "x"}, {"question": "q"}]},
         "questions[1]: give exactly one of 'answers' (a list of strings) or 'answer' (a string)"),
        ({"questions": [{"question": "q", "answer": "x", "answers": ["x"]}]},
         "questions[0]: give exactly one of 'answers'"),
        ({"questions": [{"question": "q", "answers": [3]}]},
         "questions[0]: field 'answers' must be a list of strings, got a list holding int"),
        ({"questions": [{"question": "q", "answer": 3}]},
         "questions[0]: field 'answer' must be a string, got int"),
        ({"questions": [{"question": " ", "answer": "x"}]},
         "questions[0]: field 'question' is empty"),
        ({"questions": [{"question": "q", "answers": ["x"], "hint": "h"}]},
         "questions[0]: unknown field(s) 'hint'; an item holds question, answers (or answer)"),
    ],
)  # fmt: skip
def test_malformed_questions_name_the_line_the_item_and_the_fix(tmp_path, change, expected):
    record = {**MULTI, **change}
    message = _error(tmp_path, [json.dumps(GOOD), json.dumps(record)])
    assert message.startswith("data.jsonl line 2: " + expected), message


def test_a_sample_s_own_question_must_be_its_first():
    from kvpress_lab.tasks.base import Question, Sample

    qs = (Question("A?", ("a",)), Question("B?", ("b",)))
    ok = Sample.from_questions(qs, task="t", context="c", sample_id="s")
    assert [q.question for q in ok.per_question()] == ["A?", "B?"]
    with pytest.raises(InputError, match="sample 's': its question, answers, answer_prefix"):
        Sample(task="t", context="c", question="B?", answers=("b",), sample_id="s", questions=qs)
