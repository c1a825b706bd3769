"""Samples from a user's JSONL file.

Each non-blank line is an object with ``context`` (str), ``question`` (str) and ``answers``
(non-empty list of str), and optionally ``answer_prefix`` (str), ``metric`` (str, default
``string_match_part``), ``labels`` (list of str, for the ``babilong`` metric) and ``id`` (str).

A line may instead ask several questions over its context: ``questions`` is a non-empty list of
objects, each with ``question`` (str), ``answers`` (list of str) or ``answer`` (str), and
optionally ``answer_prefix`` and ``labels`` (an item without its own takes the line's). Such a
line is one :class:`~kvpress_lab.tasks.base.Sample` with several questions (RULER's
"multi-query" idea, Hsieh et al. 2024, with one answer per question instead of one answer
listing every value).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kvpress_lab.errors import InputError
from kvpress_lab.tasks.base import METRICS, CountTokens, Question, Sample

REQUIRED = ("context", "question", "answers")
DEFAULT_METRIC = "string_match_part"


def _string_list(where: str, name: str, value: object, *, allow_empty: bool) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise InputError(
            f"{where}: field '{name}' must be a list of strings, got {type(value).__name__}"
        )
    for item in value:
        if not isinstance(item, str):
            raise InputError(
                f"{where}: field '{name}' must be a list of strings, "
                f"got a list holding {type(item).__name__}"
            )
    if not allow_empty and not any(v.strip() for v in value):
        raise InputError(f"{where}: field '{name}' must hold at least one non-empty string")
    return tuple(value)


QUESTION_ITEM = '{"question": "...", "answers": ["..."]}'


def _string(where: str, record: dict, name: str) -> None:
    if name in record and not isinstance(record[name], str):
        raise InputError(
            f"{where}: field '{name}' must be a string, got {type(record[name]).__name__}"
        )


def _parse_question(where: str, item: object, prefix: str, labels: tuple[str, ...]) -> Question:
    """One item of a line's ``questions`` list."""
    if not isinstance(item, dict):
        raise InputError(
            f"{where}: expected an object like {QUESTION_ITEM}, got {type(item).__name__}"
        )
    unknown = sorted(set(item) - {"question", "answers", "answer", "answer_prefix", "labels"})
    if unknown:
        raise InputError(
            f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; an item holds question, "
            "answers (or answer), and optionally answer_prefix and labels"
        )
    if "question" not in item:
        raise InputError(f"{where}: missing field 'question'; write each item as {QUESTION_ITEM}")
    if ("answers" in item) == ("answer" in item):
        raise InputError(
            f"{where}: give exactly one of 'answers' (a list of strings) or 'answer' (a string), "
            f"e.g. {QUESTION_ITEM}"
        )
    for name in ("question", "answer", "answer_prefix"):
        _string(where, item, name)
    if not item["question"].strip():
        raise InputError(f"{where}: field 'question' is empty; give the question to answer")
    if "answer" in item:
        if not item["answer"].strip():
            raise InputError(f"{where}: field 'answer' is empty; give the expected answer")
        answers: tuple[str, ...] = (item["answer"],)
    else:
        answers = _string_list(where, "answers", item["answers"], allow_empty=False)
    if "labels" in item:
        labels = _string_list(where, "labels", item["labels"], allow_empty=True)
    return Question(
        question=item["question"],
        answers=answers,
        answer_prefix=item.get("answer_prefix", prefix),
        labels=labels,
    )


def _parse_line(path: Path, lineno: int, line: str) -> Sample:
    where = f"{path.name} line {lineno}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    multi = "questions" in record
    if multi and ("question" in record or "answers" in record):
        raise InputError(
            f"{where}: give either 'question' and 'answers' (one question) or 'questions' (a "
            "list of them), not both; move the single question into the list"
        )
    for name in ("context",) if multi else REQUIRED:
        if name not in record:
            raise InputError(
                f"{where}: missing field '{name}' (each line needs context, question and "
                "answers, or context and a questions list)"
            )
    for name in ("context", "question", "answer_prefix", "metric", "id"):
        _string(where, record, name)
    if not record["context"].strip():
        raise InputError(f"{where}: field 'context' is empty; give the text the question is about")
    labels = _string_list(where, "labels", record.get("labels", []), allow_empty=True)
    prefix = record.get("answer_prefix", "")
    if multi:
        items = record["questions"]
        if not isinstance(items, list) or not items:
            got = "an empty list" if items == [] else type(items).__name__
            raise InputError(
                f"{where}: field 'questions' must be a non-empty list of objects like "
                f"{QUESTION_ITEM}, got {got}"
            )
        questions = [
            _parse_question(f"{where}: questions[{i}]", item, prefix, labels)
            for i, item in enumerate(items)
        ]
    else:
        if not record["question"].strip():
            raise InputError(f"{where}: field 'question' is empty; give the question to answer")
        answers = _string_list(where, "answers", record["answers"], allow_empty=False)
        questions = [Question(record["question"], answers, prefix, labels)]
    metric = record.get("metric", DEFAULT_METRIC)
    if metric not in METRICS:
        raise InputError(f"{where}: unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    meta: dict = {"source": str(path), "line": lineno}
    return Sample.from_questions(
        questions,
        task=path.stem,
        context=record["context"],
        metric=metric,
        sample_id=record.get("id", f"{path.stem}-{lineno}"),
        meta=meta,
    )


def read_jsonl(
    path: str | os.PathLike[str], n_samples: int, count_tokens: CountTokens | None = None
) -> list[Sample]:
    """The first ``n_samples`` samples of a JSONL file (all of them if it has fewer).

    Every line is validated, so a bad line is reported even past ``n_samples``.
    """
    file = Path(path)
    if not file.is_file():
        raise InputError(f"task file {str(file)!r} does not exist or is not a file")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read task file {str(file)!r}: {exc}") from exc
    numbered = [(i, line) for i, line in enumerate(lines, start=1) if line.strip()]
    if not numbered:
        raise InputError(f"task file {str(file)!r} is empty: it needs one JSON object per line")
    samples = [_parse_line(file, i, line) for i, line in numbered]
    samples = samples[:n_samples]
    if count_tokens is not None:
        for s in samples:
            s.meta["context_tokens"] = int(count_tokens(s.context))
    return samples
