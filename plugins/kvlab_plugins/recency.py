"""The ``recency`` selector: keep the most recent candidates; reads no scores."""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

from kvpress_lab.hookspecs import hookimpl
from kvpress_lab.interfaces import ScoreSource, Selector
from kvpress_lab.selection import topk_candidates


@attrs.define(kw_only=True)
class RecencySelector(Selector):
    """Keeps the ``k`` candidates in the latest cache slots (slots are in original order)."""

    name: ClassVar[str] = "recency"

    @property
    def layer_local(self) -> bool:
        """A layer's most recent candidates depend on that layer's candidates alone."""
        return True

    def select(self, source: ScoreSource, candidates: torch.Tensor, k: int) -> torch.Tensor:
        n = candidates.shape[-1]
        order = torch.arange(n, dtype=torch.float32).expand(*candidates.shape[:2], n)
        return topk_candidates(order, candidates, k)


@hookimpl
def kvlab_selectors() -> list[type]:
    return [RecencySelector]
