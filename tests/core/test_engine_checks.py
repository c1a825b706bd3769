"""Fault injection: every bad plugin output is refused by name before it touches the cache.

Selectors returning out-of-range, negative, float, duplicate or non-candidate indices; budgeters
with badly shaped counts or overlapping masks; scorers that raise, return NaN, inf or the wrong shape. Each
gives a PluginError naming the plugin (exit status 3 in the CLI), never a torch traceback and
never a silently smaller cache.
"""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from kvlab_plugins.sink_window import SinkWindowBudgeter
from kvlab_plugins.topk import TopKSelector
from tiny import tiny_model

from kvpress_lab import Composition, build_prompt, prefill_and_compress
from kvpress_lab.engine.checks import check_scores
from kvpress_lab.errors import PluginError
from kvpress_lab.failures import attribute, plugin_error
from kvpress_lab.interfaces import Allocation, Budgeter, Scorer, Selector, StepLayout
from kvpress_lab.policy import Policy

CONTEXT = "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. " * 2
QUESTION = "Which animal jumps?"
BUDGET = 40  # 4 sinks + 36 chosen by the selector


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", layers=2)


@pytest.fixture(scope="module")
def segments(lm):
    return build_prompt(lm.tokenizer, CONTEXT, QUESTION)


class IndexScorer(Scorer):
    name: ClassVar[str] = "test_index"

    def score(self, layout, observed, candidates, cache_keys):
        return layout.context_index.float()


class BadSelector(Selector):
    """Returns whatever ``make(candidates, k)`` builds."""

    name: ClassVar[str] = "test_bad_selector"

    def __init__(self, make):
        self.make = make

    def scorer_names(self):
        return ("main",)

    def select(self, source, candidates, k):
        source.scores("main", candidates)
        return self.make(candidates, k)


def _first_k(candidates: torch.Tensor, k: int) -> torch.Tensor:
    slots = torch.arange(candidates.shape[-1])
    return slots[candidates[0, 0]][:k].view(1, 1, k)


def _with_dup(c, k):
    idx = _first_k(c, k).clone()
    idx[..., -1] = idx[..., 0]
    return idx


def _non_candidate(c, k):
    idx = _first_k(c, k).clone()
    idx[..., 0] = 0  # slot 0 is a protected sink, not a candidate
    return idx


def _compose(selector=None, budgeter=None, scorer=None) -> Composition:
    return Composition(
        budgeter=budgeter or SinkWindowBudgeter(budget=BUDGET, sinks=4),
        scorers={"main": scorer or IndexScorer()},
        selector=selector or TopKSelector(granularity="head"),
    )


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda c, k: _first_k(c, k) + 10_000, r"returned slot index \d+, outside 0\.\.\d+"),
        (lambda c, k: _first_k(c, k) - 10_000, r"returned slot index -\d+, outside 0\.\.\d+"),
        (
            lambda c, k: _first_k(c, k).float(),
            "returned indices of dtype float32; expected integer",
        ),
        (lambda c, k: _first_k(c, k).bool(), r"returned a mask of shape \(1, 1, 36\); expected"),
        (_with_dup, r"returned the same slot twice in one row \(layer 0, KV head 0\)"),
        (_non_candidate, "selected slots that are not candidates"),
        (lambda c, k: _first_k(c, k)[..., :-1], r"returned shape \(1, 1, 35\); expected"),
        (lambda c, k: _first_k(c, k).tolist(), "returned list; expected a long tensor"),
        (lambda c, k: _first_k(c, k).expand(3, 1, k), r"returned shape \(3, 1, 36\)"),
    ],
    ids=[
        "too-large",
        "negative",
        "float",
        "bool",
        "duplicate",
        "non-candidate",
        "short",
        "list",
        "bad-layers",
    ],  # fmt: skip
)
def test_bad_selector_output_is_refused_by_name(lm, segments, make, message):
    comp = _compose(selector=BadSelector(make))
    with pytest.raises(PluginError, match=f"^selector 'test_bad_selector' {message}"):
        prefill_and_compress(lm, comp, segments)


def test_good_selector_output_keeps_exactly_the_budget(lm, segments):
    state = prefill_and_compress(lm, _compose(selector=BadSelector(_first_k)), segments)
    assert state.kept_tokens == BUDGET
    assert all(len(set(row.tolist())) == BUDGET for row in state.context_index.flatten(0, 1))


class MaskBudgeter(Budgeter):
    """Sinks protected, the rest candidates, then ``tweak(layout, protected, candidates, k)``."""

    name: ClassVar[str] = "test_bad_budgeter"

    def __init__(self, tweak):
        self.tweak = tweak

    def target_tokens(self, context_length):
        return BUDGET

    def allocate(self, layout: StepLayout) -> Allocation:
        ctx = ~layout.question_mask
        protected = ctx.clone()
        protected[..., 4:] = False
        candidates = ctx & ~protected
        return self.tweak(layout, protected, candidates, BUDGET - 4)


def _bad_counts(layout, p, c, k):
    return Allocation(p, c, torch.tensor([[k, k, k]]))  # 3 heads on a 4-head model


def _overlap(layout, p, c, k):
    return Allocation(p, c | p, k)


@pytest.mark.parametrize(
    ("tweak", "message"),
    [
        (_bad_counts, r"returned k of shape \(1, 3\); expected \[1 or 2 layers, 1 or 2 KV heads\]"),
        (
            lambda lay, p, c, k: Allocation(p, c, torch.tensor([[k], [10_000]])),
            r"asked to keep 10000 of only \d+ candidates at layer 1, KV head 0",
        ),
        (
            lambda lay, p, c, k: Allocation(p, c, torch.tensor([[1.5]])),
            r"returned k of dtype float32; expected a long tensor",
        ),
        (_overlap, r"marked 4 slot\(s\) both protected and candidate"),
        (lambda lay, p, c, k: Allocation(p.float(), c, k), "returned protected of dtype float32"),
        (lambda lay, p, c, k: Allocation(p, c, 2.5), r"returned k=2\.5 \(float\); expected an int"),
        (lambda lay, p, c, k: Allocation(p, c, -1), "asked to keep k=-1 candidates"),
        (
            lambda lay, p, c, k: Allocation(p, c, 10_000),
            r"asked to keep 10000 of only \d+ candidates",
        ),
        (
            lambda lay, p, c, k: Allocation(p, lay.question_mask | c, k),
            "marked question slots as candidates",
        ),
        (lambda lay, p, c, k: Allocation(p[..., :-1], c, k), "returned protected of shape"),
        (lambda lay, p, c, k: (p, c, k), "returned tuple, not an Allocation"),
    ],
    ids=[
        "counts-shape",
        "counts-too-many",
        "counts-float",
        "overlap",
        "float-mask",
        "float-k",
        "negative-k",
        "too-many",
        "question",
        "shape",
        "tuple",
    ],  # fmt: skip
)
def test_bad_budgeter_output_is_refused_by_name(lm, segments, tweak, message):
    comp = _compose(budgeter=MaskBudgeter(tweak))
    with pytest.raises(PluginError, match=f"^budgeter 'test_bad_budgeter' {message}"):
        prefill_and_compress(lm, comp, segments)


class FixedScorer(Scorer):
    name: ClassVar[str] = "test_fixed_scorer"

    def __init__(self, make):
        self.make = make

    def score(self, layout, observed, candidates, cache_keys):
        return self.make(layout)


class RaisingScorer(Scorer):
    name: ClassVar[str] = "test_raising_scorer"

    def observe(self, obs):
        raise RuntimeError("observe exploded\nsecond line")

    def score(self, layout, observed, candidates, cache_keys):  # pragma: no cover - never reached
        return layout.context_index.float()


class WrappingPolicy(Policy):
    """A policy object around a fixed composition, as a plugin policy would be."""

    name: ClassVar[str] = "test_wrapping"

    def __init__(self, comp):
        self._comp = comp

    def compose(self):
        return self._comp


def test_scorer_with_wrong_shape_is_named(lm, segments):
    comp = _compose(scorer=FixedScorer(lambda lay: torch.zeros(1, 1, 3)))
    with pytest.raises(PluginError, match="^scorer 'test_fixed_scorer' returned shape"):
        prefill_and_compress(lm, comp, segments)


@pytest.mark.parametrize(("value", "label"), [(float("nan"), "NaN"), (float("inf"), "inf")])
def test_non_finite_scores_are_refused_through_the_engine(lm, segments, value, label):
    def poisoned(layout):
        scores = layout.context_index.float().clone()
        scores[..., 5] = value  # a candidate slot (slots 0..3 are the protected sinks)
        return scores

    comp = _compose(scorer=FixedScorer(poisoned))
    with pytest.raises(PluginError, match=rf"^scorer 'test_fixed_scorer' returned {label}"):
        prefill_and_compress(lm, comp, segments)


def test_raising_scorer_is_attributed_with_its_distribution(lm, segments):
    comp = _compose(scorer=RaisingScorer())
    with pytest.raises(RuntimeError) as info:
        prefill_and_compress(lm, comp, segments)
    failure = attribute(info.value, WrappingPolicy(comp))
    assert failure is not None
    assert (failure.kind, failure.name, failure.policy) == (
        "scorer",
        "test_raising_scorer",
        "test_wrapping",
    )
    assert failure.error == "raised RuntimeError: observe exploded"
    assert "not an installed distribution" in failure.distribution
    message = str(plugin_error(info.value, WrappingPolicy(comp)))
    assert message.startswith("plugin failed: scorer 'test_raising_scorer' (module ")
    assert "\n" not in message and "choose another policy" in message


def test_engine_check_error_is_attributed_to_the_right_component(lm, segments):
    comp = _compose(selector=BadSelector(_with_dup))
    with pytest.raises(PluginError) as info:
        prefill_and_compress(lm, comp, segments)
    failure = attribute(info.value, WrappingPolicy(comp))
    assert (failure.kind, failure.name) == ("selector", "test_bad_selector")
    assert failure.error.startswith("returned the same slot twice")


def test_first_party_component_names_its_distribution(lm, segments):
    comp = _compose(selector=TopKSelector(granularity="head"), budgeter=MaskBudgeter(_bad_counts))
    with pytest.raises(PluginError) as info:
        prefill_and_compress(lm, comp, segments)
    failure = attribute(info.value, WrappingPolicy(comp))
    assert failure.kind == "budgeter"
    # TopKSelector is first-party: its distribution is found by module
    selector = attribute(PluginError("selector 'topk' exploded"), WrappingPolicy(comp))
    assert selector.distribution.startswith("kvpress-lab ")


def test_unrelated_exception_is_not_blamed_on_a_plugin():
    comp = _compose()
    assert attribute(ValueError("nothing to do with plugins"), WrappingPolicy(comp)) is None


def _layout(n_ctx=8, n_q=2):
    index = torch.cat([torch.arange(n_ctx), torch.full((n_q,), -1)]).expand(2, 2, -1)
    return StepLayout(
        context_length=n_ctx, block_index=0, n_blocks=1, block_start=0, block_end=n_ctx,
        n_past=0, n_question=n_q, context_index=index,
    )  # fmt: skip


@pytest.mark.parametrize(("value", "label"), [(float("nan"), "NaN"), (float("inf"), "inf")])
def test_check_scores_refuses_non_finite_candidates(value, label):
    layout = _layout()
    candidates = ~layout.question_mask
    scores = torch.zeros(2, 1, 10)
    scores[1, 0, 3] = value
    with pytest.raises(
        PluginError,
        match=rf"^scorer 'nanny' returned {label} for 2 candidate slot\(s\) \(first at layer 1, KV head 0\)",
    ):
        check_scores(scores, candidates, layout, "nanny")
    # -inf on non-candidate slots is a legitimate mask
    scores = torch.zeros(2, 1, 10)
    scores[..., 8:] = float("-inf")
    assert check_scores(scores, candidates, layout, "nanny") is scores
    with pytest.raises(PluginError, match=r"returned shape \(2, 3, 10\)"):
        check_scores(torch.zeros(2, 3, 10), candidates, layout, "nanny")
