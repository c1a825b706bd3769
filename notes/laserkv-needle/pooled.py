"""Diagnostic only: LASER-KV and SnapKV with script-local scorers swapped in (needle.py specs)."""

import attrs
import torch
import torch.nn.functional as F
from kvlab_plugins.exact import ExactScorer
from kvlab_plugins.laserkv import LaserKVPolicy
from kvlab_plugins.snapkv import SnapKVPolicy, SnapKVScorer
from kvlab_plugins.topk import TopKSelector

from kvpress_lab.policy import Composition
from kvpress_lab.registry import default_registry


@attrs.define(kw_only=True)
class PooledExact(ExactScorer):
    kernel: int = 7

    def score(self, layout, observed, candidates, cache_keys):
        s = super().score(layout, observed, candidates, cache_keys)
        k = self.kernel
        return F.max_pool1d(s.view(1, 1, -1), k, 1, k // 2).view(s.shape)


def with_exact(scorer: type) -> type:
    """A LASER-KV policy whose ``exact`` scorer is ``scorer()``, everything else as shipped."""

    @attrs.define(kw_only=True)
    class Swapped(LaserKVPolicy):
        def compose(self) -> Composition:
            c = super().compose()
            return attrs.evolve(c, scorers={**c.scorers, "exact": scorer()})

    return Swapped


class MaxHeadExact(ExactScorer):
    """The exact score's max over layers and KV heads instead of its sum (consensus hypothesis)."""

    def score(self, layout, observed, candidates, cache_keys):
        per_layer = [o for o in observed if o is not None]
        total = per_layer[0].amax(dim=0)
        for o in per_layer[1:]:
            total = torch.maximum(total, o.amax(dim=0).to(total.device))
        return total.view(1, 1, -1)


class GlobalSnapKVScorer(SnapKVScorer):
    """SnapKV's pooled window votes summed over layers and KV heads: one index set, like LASER-KV."""

    def score(self, layout, observed, candidates, cache_keys):
        return (
            super().score(layout, observed, candidates, cache_keys).sum(dim=(0, 1)).view(1, 1, -1)
        )


@attrs.define(kw_only=True)
class GlobalSnapKV(SnapKVPolicy):
    def compose(self) -> Composition:
        return attrs.evolve(
            super().compose(),
            scorers={"main": GlobalSnapKVScorer(window=self.window, kernel=self.kernel)},
            selector=TopKSelector(scorer="main", granularity="global"),
        )


PooledLaser = with_exact(PooledExact)
MaxHeadLaser = with_exact(MaxHeadExact)


class LocalPolicies:
    """The installed registry plus this folder's variants, so ``load_policy`` parses every spec."""

    local = {"pooled": PooledLaser, "maxhead": MaxHeadLaser, "globalsnap": GlobalSnapKV}

    def policy_class(self, name: str) -> type:
        return self.local.get(name) or default_registry().policy_class(name)


LOCAL = LocalPolicies()
