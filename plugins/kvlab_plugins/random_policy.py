"""The ``random`` policy: seeded uniformly random eviction, the floor any policy must beat."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import attrs
import torch

from kvlab_plugins.sink_window import SinkWindowBudgeter
from kvlab_plugins.topk import TopKSelector
from kvpress_lab.hookspecs import hookimpl
from kvpress_lab.interfaces import Scorer, StepLayout
from kvpress_lab.params import Expose, policy_with
from kvpress_lab.policy import Composition


@attrs.define(kw_only=True)
class RandomScorer(Scorer):
    """Independent uniform scores per layer, KV head and slot, from a seeded generator."""

    name: ClassVar[str] = "random"
    seed: int = 0

    def score(
        self,
        layout: StepLayout,
        observed: Sequence[torch.Tensor | None],
        candidates: torch.Tensor,
        cache_keys: Callable[[int], torch.Tensor],
    ) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + layout.block_index)
        return torch.rand(layout.context_index.shape, generator=gen)


@attrs.define(kw_only=True)
class RandomPolicy(policy_with(RandomScorer, Expose(TopKSelector, only="granularity"))):
    """Keeps a random subset of ``keep_ratio`` of the context; reproducible by ``seed``.

    ``seed`` is the scorer's, ``granularity`` the selector's.
    """

    name: ClassVar[str] = "random"

    def compose(self) -> Composition:
        return Composition(
            budgeter=self.build(SinkWindowBudgeter),
            scorers={"main": self.build(RandomScorer)},
            selector=self.build(TopKSelector),
        )


@hookimpl
def kvlab_scorers() -> list[type]:
    return [RandomScorer]


@hookimpl
def kvlab_policies() -> list[type]:
    return [RandomPolicy]
