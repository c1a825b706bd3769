"""An attention-observing test policy (SnapKV-like) and a registry that holds it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import attrs
import torch
from kvlab_plugins.sink_window import SinkWindowBudgeter
from kvlab_plugins.topk import TopKSelector

from kvpress_lab.interfaces import LayerObservation, Scorer, StepLayout
from kvpress_lab.policy import Composition, EngineOptions, Policy
from kvpress_lab.registry import Component, PluginInfo, Registry, default_registry


class QuestionAttentionScorer(Scorer):
    """Attention of the observation rows to every slot, summed over rows and query heads."""

    name: ClassVar[str] = "test_question_attention"

    def observe(self, obs: LayerObservation) -> torch.Tensor:
        return obs.attention(obs.observation_rows()).sum(dim=(0, 2, 3))  # [H, N]

    def score(
        self,
        layout: StepLayout,
        observed: Sequence[torch.Tensor | None],
        candidates: torch.Tensor,
        cache_keys: Callable[[int], torch.Tensor],
    ) -> torch.Tensor:
        return torch.stack(list(observed))


@attrs.define(kw_only=True)
class AttentionPolicy(Policy):
    """Keeps the slots the question attends to most, per KV head (a SnapKV-like test policy)."""

    name: ClassVar[str] = "test_attention"
    sinks: int = 2
    block_size: int | None = None
    position_mode: str = "original"

    def compose(self) -> Composition:
        return Composition(
            budgeter=SinkWindowBudgeter(
                keep_ratio=self.keep_ratio, budget=self.budget, sinks=self.sinks
            ),
            scorers={"main": QuestionAttentionScorer()},
            selector=TopKSelector(granularity="head"),
            engine=EngineOptions(block_size=self.block_size, position_mode=self.position_mode),
        )


def registry_with_test_policy() -> Registry:
    """The installed plugins plus ``test_attention``."""
    base = default_registry()
    info = PluginInfo("test_attention", __name__, "tests", "0")
    components = {kind: dict(table) for kind, table in base.components.items()}
    components["policy"]["test_attention"] = Component(
        "policy", "test_attention", AttentionPolicy, info
    )
    return Registry(components, (*base.plugins, info), base.problems)
