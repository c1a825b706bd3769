"""The ``topk`` selector: keep the k best-scored candidates at a chosen granularity."""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

from kvpress_lab.hookspecs import hookimpl
from kvpress_lab.interfaces import ScoreSource, Selector
from kvpress_lab.selection import Granularity, reduce_scores, topk_candidates


@attrs.define(kw_only=True)
class TopKSelector(Selector):
    """Top-k of one scorer's scores: one index set globally, per layer, or per KV head."""

    name: ClassVar[str] = "topk"
    scorer: str = "main"
    granularity: Granularity = attrs.field(
        default="head", validator=attrs.validators.in_(("global", "layer", "head"))
    )

    def scorer_names(self) -> tuple[str, ...]:
        return (self.scorer,)

    @property
    def layer_local(self) -> bool:
        """Per-layer and per-head selections decide each layer alone; a global one does not."""
        return self.granularity != "global"

    def select(self, source: ScoreSource, candidates: torch.Tensor, k: int) -> torch.Tensor:
        scores = reduce_scores(source.scores(self.scorer, candidates), self.granularity)
        return topk_candidates(scores, candidates, k)


@hookimpl
def kvlab_selectors() -> list[type]:
    return [TopKSelector]
