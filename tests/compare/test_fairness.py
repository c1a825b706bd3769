"""kvlab compare judges fairness against floor(keep_ratio * L), never a policy's own prediction."""

from __future__ import annotations

import math
from typing import ClassVar

import attrs
import pytest
from kvlab_plugins.random_policy import RandomScorer
from kvlab_plugins.sink_window import SinkWindowBudgeter
from kvlab_plugins.topk import TopKSelector
from tiny import tiny_model

from kvpress_lab.compare import compare
from kvpress_lab.policy import Composition, Policy
from kvpress_lab.registry import Component, PluginInfo, Registry, default_registry


@attrs.define(kw_only=True)
class _OvershootingBudgeter(SinkWindowBudgeter):
    """Keeps 5 % more than floor(r L) and says so in its own target."""

    def target_tokens(self, context_length: int) -> int:
        return math.floor(1.05 * super().target_tokens(context_length))


@attrs.define(kw_only=True)
class OvershootPolicy(Policy):
    """A policy that overshoots its budget by 5 % and predicts exactly that overshoot."""

    name: ClassVar[str] = "test_overshoot"

    def target_tokens(self, context_length: int) -> int:
        return self.compose().budgeter.target_tokens(context_length)

    def compose(self) -> Composition:
        return Composition(
            budgeter=_OvershootingBudgeter(keep_ratio=self.keep_ratio, budget=self.budget),
            selector=TopKSelector(scorer="main", granularity="global"),
            scorers={"main": RandomScorer()},
        )


def _registry() -> Registry:
    base = default_registry()
    info = PluginInfo("test_overshoot", __name__, "tests", "0")
    components = {kind: dict(table) for kind, table in base.components.items()}
    components["policy"]["test_overshoot"] = Component(
        "policy", "test_overshoot", OvershootPolicy, info
    )
    return Registry(components, (*base.plugins, info), base.problems)


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", layers=2)


def test_a_policy_overshooting_by_five_percent_is_unfair(lm, tmp_path):
    res = compare(
        ["test_overshoot", "random"],
        tasks=["niah"],
        lengths=[600],
        keeps=[0.5],
        samples=2,
        lm=lm,
        out=tmp_path,
        registry=_registry(),
        max_new_tokens=2,
        progress=False,
        share_prefill=False,
    )
    over = [r for r in res.rows if r["spec"] == "test_overshoot"]
    assert len(over) == 2
    for r in over:
        plain = math.floor(0.5 * r["prompt_tokens"])
        assert r["target_tokens"] == plain  # not the policy's own 1.05 x prediction
        assert r["kept_tokens"] == math.floor(1.05 * plain)
    fair = {s["policy"]: s["fair"] for s in res.summary}
    assert fair == {"full": True, "test_overshoot": False, "random": True}
    md = (tmp_path / "summary.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("| `test_overshoot` |"))
    assert line.endswith("| **no** |") and "| yes |" not in line
    assert "not comparable: unfair budget" in line
    assert "## Fairness warnings" in md
