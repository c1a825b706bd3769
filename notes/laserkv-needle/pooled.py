"""Diagnostic only: LASER-KV with its global exact score max-pooled over neighbouring slots."""

import attrs
import torch.nn.functional as F
from kvlab_plugins.exact import ExactScorer
from kvlab_plugins.laserkv import LaserKVPolicy

from kvpress_lab.policy import Composition


@attrs.define(kw_only=True)
class PooledExact(ExactScorer):
    kernel: int = 7

    def score(self, layout, observed, candidates, cache_keys):
        s = super().score(layout, observed, candidates, cache_keys)
        k = self.kernel
        return F.max_pool1d(s.view(1, 1, -1), k, 1, k // 2).view(s.shape)


@attrs.define(kw_only=True)
class PooledLaser(LaserKVPolicy):
    def compose(self) -> Composition:
        c = super().compose()
        return Composition(
            budgeter=c.budgeter,
            scorers={**c.scorers, "exact": PooledExact()},
            selector=c.selector,
            engine=c.engine,
        )
