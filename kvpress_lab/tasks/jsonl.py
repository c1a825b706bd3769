"""Samples from a user's JSONL file.

Each non-blank line is an object with ``context`` (str), ``question`` (str) and ``answers``
(non-empty list of str), and optionally ``answer_prefix`` (str), ``metric`` (str, default
``string_match_part``), ``labels`` (list of str, for the ``babilong`` metric) and ``id`` (str).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kvpress_lab.errors import InputError
from kvpress_lab.tasks.base import METRICS, CountTokens, Sample

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


def _parse_line(path: Path, lineno: int, line: str) -> Sample:
    where = f"{path.name} line {lineno}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for name in REQUIRED:
        if name not in record:
            raise InputError(
                f"{where}: missing field '{name}' (each line needs context, question, answers)"
            )
    for name in ("context", "question", "answer_prefix", "metric", "id"):
        if name in record and not isinstance(record[name], str):
            raise InputError(
                f"{where}: field '{name}' must be a string, got {type(record[name]).__name__}"
            )
    if not record["context"].strip():
        raise InputError(f"{where}: field 'context' is empty; give the text the question is about")
    if not record["question"].strip():
        raise InputError(f"{where}: field 'question' is empty; give the question to answer")
    answers = _string_list(where, "answers", record["answers"], allow_empty=False)
    labels = _string_list(where, "labels", record.get("labels", []), allow_empty=True)
    metric = record.get("metric", DEFAULT_METRIC)
    if metric not in METRICS:
        raise InputError(f"{where}: unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    context = record["context"]
    meta: dict = {"source": str(path), "line": lineno}
    return Sample(
        task=path.stem,
        context=context,
        question=record["question"],
        answers=answers,
        answer_prefix=record.get("answer_prefix", ""),
        metric=metric,
        labels=labels,
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
