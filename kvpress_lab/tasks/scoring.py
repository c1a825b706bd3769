"""Scoring rules of RULER (Hsieh et al. 2024) and BABILong (Kuratov et al. 2024).

Every rule scores an empty (or whitespace-only) prediction as wrong.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvpress_lab.errors import InputError


def _check_references(references: Sequence[str]) -> list[str]:
    if isinstance(references, str):
        raise InputError("references must be a sequence of strings, not a single string")
    refs = [r for r in references if r.strip()]
    if not refs:
        raise InputError("cannot score a prediction without a non-empty reference answer")
    return refs


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """RULER's string_match_all: the fraction of references found in the prediction.

    Matching is a case-insensitive substring test.
    """
    refs = _check_references(references)
    pred = prediction.strip().lower()
    if not pred:
        return 0.0
    return sum(r.strip().lower() in pred for r in refs) / len(refs)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """RULER's string_match_part: 1.0 if any reference is found in the prediction, else 0.0.

    Matching is a case-insensitive substring test (RULER takes the max over the references).
    """
    refs = _check_references(references)
    pred = prediction.strip().lower()
    if not pred:
        return 0.0
    return 1.0 if any(r.strip().lower() in pred for r in refs) else 0.0


def babilong_match(prediction: str, target: str, question: str, labels: Sequence[str]) -> float:
    """BABILong's rule: 1.0 if the target is the only task label in the prediction's first sentence.

    The prediction is lower-cased and cut at its first '.'; labels that occur in the question
    are not counted. The target counts as a label even when ``labels`` omits it. An empty
    prediction is wrong (LASER-KV's copy of this rule scored it as right).
    """
    goal = target.strip().lower()
    if not goal:
        raise InputError("cannot score a prediction without a non-empty target answer")
    if isinstance(labels, str):
        raise InputError("labels must be a sequence of strings, not a single string")
    text = prediction.lower().split(".", 1)[0].strip()
    if not text:
        return 0.0
    all_labels = {label.strip().lower() for label in labels if label.strip()} | {goal}
    asked = question.lower()
    present = {label for label in all_labels if label in text and label not in asked}
    return 1.0 if present == {goal} else 0.0
