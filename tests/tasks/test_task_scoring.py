"""Scoring rules of RULER and BABILong on hand-written predictions."""

from __future__ import annotations

import pytest

from kvpress_lab.errors import InputError
from kvpress_lab.tasks import Sample, score
from kvpress_lab.tasks.scoring import babilong_match, string_match_all, string_match_part

EMPTY_PREDICTIONS = ["", "   ", "\n\t"]
LOCATIONS = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")


# -- RULER string_match_all -------------------------------------------------------------------


def test_string_match_all_counts_the_fraction_of_references_found():
    refs = ["ABCDE", "FGHIJ", "KLMNO"]
    assert string_match_all("they are: ABCDE, FGHIJ, KLMNO", refs) == 1.0
    assert string_match_all("they are: ABCDE and KLMNO", refs) == pytest.approx(2 / 3)
    assert string_match_all("they are: none of them", refs) == 0.0


def test_string_match_all_is_case_insensitive():
    assert string_match_all("the number is 12ab34", ["12AB34"]) == 1.0
    assert string_match_all("The Answer Is abcde", ["ABCDE", "answer"]) == 1.0


@pytest.mark.parametrize("prediction", EMPTY_PREDICTIONS)
def test_string_match_all_empty_prediction_is_wrong(prediction):
    assert string_match_all(prediction, ["1234567"]) == 0.0


# -- RULER string_match_part ------------------------------------------------------------------


def test_string_match_part_is_right_when_any_reference_is_found():
    refs = ["Paris", "the capital of France"]
    assert string_match_part("It is paris.", refs) == 1.0
    assert string_match_part("THE CAPITAL OF FRANCE, of course", refs) == 1.0
    assert string_match_part("It is Lyon.", refs) == 0.0


@pytest.mark.parametrize("prediction", EMPTY_PREDICTIONS)
def test_string_match_part_empty_prediction_is_wrong(prediction):
    assert string_match_part(prediction, ["Paris"]) == 0.0


@pytest.mark.parametrize("rule", [string_match_all, string_match_part])
def test_string_match_rules_refuse_missing_references(rule):
    with pytest.raises(InputError, match="reference"):
        rule("anything", [])
    with pytest.raises(InputError, match="reference"):
        rule("anything", [" "])


# -- BABILong ---------------------------------------------------------------------------------


def test_babilong_right_answer_in_various_forms():
    q = "Where is Mary?"
    assert babilong_match("kitchen", "kitchen", q, LOCATIONS) == 1.0
    assert babilong_match(" the Kitchen.", "kitchen", q, LOCATIONS) == 1.0
    assert babilong_match("Mary is in the KITCHEN", "kitchen", q, LOCATIONS) == 1.0


def test_babilong_wrong_label_is_wrong():
    assert babilong_match("garden", "kitchen", "Where is Mary?", LOCATIONS) == 0.0


def test_babilong_two_labels_present_is_wrong():
    q = "Where is Mary?"
    assert babilong_match("kitchen or garden", "kitchen", q, LOCATIONS) == 0.0
    assert babilong_match("the garden, then the kitchen", "kitchen", q, LOCATIONS) == 0.0


def test_babilong_labels_in_the_question_are_ignored():
    q = "Where was the apple before the kitchen?"
    # "kitchen" is a label, but it is in the question, so it does not make the answer ambiguous
    assert babilong_match("the garden, before the kitchen", "garden", q, LOCATIONS) == 1.0
    # the same prediction with a question that does not name the kitchen has two labels
    q2 = "Where was the apple before the office?"
    assert babilong_match("the garden, before the kitchen", "garden", q2, LOCATIONS) == 0.0


def test_babilong_text_after_the_first_period_is_ignored():
    q = "Where is Mary?"
    assert babilong_match("kitchen. Before that, the garden.", "kitchen", q, LOCATIONS) == 1.0
    assert babilong_match("garden. No, wait: kitchen", "kitchen", q, LOCATIONS) == 0.0


def test_babilong_answer_must_be_a_label_word_and_target_counts_as_label():
    q = "Who gave the apple to Bill?"
    labels = ("Fred", "Bill", "Jeff", "Mary", "apple", "football", "milk")
    assert babilong_match("Fred gave the apple to Bill", "Fred", q, labels) == 1.0
    assert babilong_match("Jeff and Fred", "Fred", q, labels) == 0.0
    assert babilong_match("nobody", "Fred", q, labels) == 0.0
    # a target outside the label set still has to be present, and alone
    assert babilong_match("the cellar", "cellar", "Where is Mary?", LOCATIONS) == 1.0
    assert babilong_match("the cellar or garden", "cellar", "Where is Mary?", LOCATIONS) == 0.0


@pytest.mark.parametrize("prediction", [*EMPTY_PREDICTIONS, ".", " . kitchen", "..."])
def test_babilong_empty_prediction_is_wrong(prediction):
    # LASER-KV's copy of the rule scored an empty prediction as right; it must be wrong.
    assert babilong_match(prediction, "kitchen", "Where is Mary?", LOCATIONS) == 0.0
    assert babilong_match(prediction, "kitchen", "Where is Mary?", ()) == 0.0


def test_babilong_empty_target_is_an_input_error():
    with pytest.raises(InputError, match="target"):
        babilong_match("kitchen", "", "Where is Mary?", LOCATIONS)


# -- dispatch ---------------------------------------------------------------------------------


def _sample(metric: str, answers: tuple[str, ...], **kw) -> Sample:
    return Sample(
        task="t", context="c", question="Where is Mary?", answers=answers, metric=metric, **kw
    )


def test_score_dispatches_on_the_metric():
    both = ("ABCDE", "FGHIJ")
    assert score(_sample("string_match_all", both), "abcde only") == 0.5
    assert score(_sample("string_match_part", both), "abcde only") == 1.0
    babi = _sample("babilong", ("kitchen",), labels=LOCATIONS)
    assert score(babi, "kitchen.") == 1.0
    assert score(babi, "garden and kitchen") == 0.0


@pytest.mark.parametrize("metric", ["string_match_all", "string_match_part", "babilong"])
@pytest.mark.parametrize("prediction", EMPTY_PREDICTIONS)
def test_score_empty_prediction_is_wrong_for_every_metric(metric, prediction):
    assert score(_sample(metric, ("kitchen",), labels=LOCATIONS), prediction) == 0.0


def test_score_unknown_metric_is_an_input_error():
    with pytest.raises(InputError, match="unknown metric 'bleu'"):
        score(_sample("bleu", ("x",)), "x")
