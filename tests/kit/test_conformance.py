"""The conformance suite: every installed policy passes it, and broken plugins fail it clearly."""

from __future__ import annotations

import textwrap
from importlib.metadata import EntryPoint

import pytest

from kvpress_lab.registry import default_registry, discover
from kvpress_lab.testing.conformance import (
    CHECKS,
    ConformanceError,
    check_policy,
    conformance_cases,
    run_check,
    spec_string,
)


@pytest.mark.parametrize(("policy", "check"), conformance_cases())
def test_installed_policy_conforms(policy, check):
    run_check(policy, check)


def test_cases_cover_every_policy_and_check():
    cases = conformance_cases()
    names = default_registry().names("policy")
    assert {"full", "random"} <= set(names)
    assert len(cases) == len(names) * len(CHECKS)
    assert {c.values for c in cases} == {(p, c) for p in names for c in CHECKS}


BROKEN = '''
from typing import ClassVar

import attrs
import torch

from kvlab_plugins.sink_window import SinkWindowBudgeter
from kvlab_plugins.topk import TopKSelector
from kvpress_lab.hookspecs import hookimpl
from kvpress_lab.interfaces import Allocation, Budgeter, Scorer
from kvpress_lab.policy import Composition, Policy


class GreedyBudgeter(Budgeter):
    """Claims the right target but keeps twice as many tokens."""

    name: ClassVar[str] = "greedy_budgeter"

    def __init__(self, keep):
        self.keep = keep

    def target_tokens(self, n):
        return max(1, int(self.keep * n))

    def allocate(self, layout):
        ctx = ~layout.question_mask
        n_ctx = int(ctx[0, 0].sum())
        k = min(n_ctx, 2 * self.target_tokens(layout.context_length))
        if k >= n_ctx:
            return Allocation.keep_all(layout)
        return Allocation(protected=torch.zeros_like(ctx), candidates=ctx, k=k)


class NoiseScorer(Scorer):
    name: ClassVar[str] = "noise"

    def score(self, layout, observed, candidates, cache_keys):
        return torch.rand(layout.context_index.shape)  # unseeded: not deterministic


@attrs.define(kw_only=True)
class GreedyPolicy(Policy):
    name: ClassVar[str] = "greedy"

    def compose(self):
        return Composition(
            budgeter=GreedyBudgeter(self.keep_ratio),
            selector=TopKSelector(),
            scorers={"main": NoiseScorer()},
        )


@attrs.define(kw_only=True)
class NoDefaultPolicy(Policy):
    name: ClassVar[str] = "nodefault"
    window: int

    def compose(self):
        return Composition(budgeter=SinkWindowBudgeter(keep_ratio=self.keep_ratio),
                           selector=TopKSelector(), scorers={"main": NoiseScorer()})


@hookimpl
def kvlab_policies():
    return [GreedyPolicy, NoDefaultPolicy]
'''


@pytest.fixture
def broken_registry(tmp_path, monkeypatch):
    (tmp_path / "kvlab_broken_plugin.py").write_text(textwrap.dedent(BROKEN))
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [
        EntryPoint("full", "kvlab_plugins.full", "kvpress_lab"),
        EntryPoint("broken", "kvlab_broken_plugin", "kvpress_lab"),
    ]
    registry = discover(eps)
    assert registry.problems == ()
    return registry


def test_budget_ignoring_plugin_fails_with_clear_message(broken_registry):
    with pytest.raises(ConformanceError) as info:
        check_policy("greedy", registry=broken_registry)
    msg = str(info.value)
    assert msg.startswith("policy 'greedy' fails ")
    assert (
        "  - budget: GreedyPolicy(keep_ratio=0.25, budget=None, decode_interval=None, "
        "decode_budget=None): kept 128 of 256" in msg
    )
    assert "the budget asks for 64 (allowed difference 1%)" in msg
    assert (
        "  - determinism: two runs of GreedyPolicy(keep_ratio=0.25, budget=None, "
        "decode_interval=None, decode_budget=None) on the same" in msg
    )
    # the contract checks it does honour pass
    for ok in ("registered", "fields", "spec_roundtrip"):
        assert f"  - {ok}:" not in msg


def test_single_check_names_policy_and_check(broken_registry):
    with pytest.raises(ConformanceError, match=r"^policy 'greedy' fails check 'budget': "):
        run_check("greedy", "budget", registry=broken_registry)
    run_check("greedy", "fields", registry=broken_registry)  # passes: no exception


def test_field_without_default_fails(broken_registry):
    with pytest.raises(ConformanceError, match=r"hyperparameter\(s\) \['window'\] have no default"):
        run_check("nodefault", "fields", registry=broken_registry)


def test_unregistered_name_and_class(broken_registry):
    with pytest.raises(ConformanceError, match=r"no policy named 'keynorm_missing' is registered"):
        run_check("keynorm_missing", "registered", registry=broken_registry)
    from kvlab_plugins.random_policy import RandomPolicy

    with pytest.raises(ConformanceError, match=r"\[project.entry-points.kvpress_lab\]"):
        run_check(RandomPolicy, "registered", registry=broken_registry)
    assert check_policy(RandomPolicy, checks=["registered", "fields"]) == ["registered", "fields"]


def test_unknown_check_name():
    with pytest.raises(ValueError, match="unknown check 'speed'"):
        run_check("full", "speed")


def test_spec_string_round_trips():
    from kvpress_lab.spec import load_policy

    policy = load_policy("random:keep_ratio=0.3,seed=7,granularity=layer")
    assert spec_string(policy) == (
        "random:keep_ratio=0.3,budget=none,decode_interval=none,decode_budget=none,"
        "seed=7,granularity=layer"
    )
    assert load_policy(spec_string(policy)) == policy
    assert spec_string(load_policy("full")) == "full:decode_interval=none,decode_budget=none"
