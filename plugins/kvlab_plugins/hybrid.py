"""The ``hybrid`` selector: LASER-KV's split between exact attention and LSH.

LASER-KV (Sood, Sharma, Agrawal, arXiv 2602.02199) keeps ``k`` candidates per block in two
disjoint parts: ``primary = floor(alpha * k)`` by the exact scorer (global attention consensus)
among all candidates, then ``k - primary`` by the LSH scorer among the candidates the exact
scorer did not take (the LSH scorer is called with those remaining candidates, so its centring
uses them). ``alpha=1`` is exact-only, ``alpha=0`` LSH-only. One index set is shared by every
layer and KV head (global granularity).

``redistribute``: the engine needs exactly ``k`` kept candidates, and the LSH ranking always
fills its share (magicpig: after the candidates hit in >= 2 tables come the most recent others;
frequency_rank: after those hit in >= 1 table come the others by distance). The reference code
does not redistribute, which is the default here: that fill stays. With ``redistribute=True``
the LSH part keeps only the candidates its hash matched (positive LSH scores) and hands the
slots it could not fill on merit back to the exact scorer's next best. The exact side always
fills its share, so nothing flows the other way.
"""

from __future__ import annotations

import math
from typing import ClassVar

import attrs
import torch

from kvpress_lab.errors import ConfigError
from kvpress_lab.hookspecs import hookimpl
from kvpress_lab.interfaces import ScoreSource, Selector
from kvpress_lab.selection import reduce_scores, topk_candidates
from kvpress_lab.validators import unit_interval

__all__ = ["HybridSelector", "check_alpha"]


check_alpha = unit_interval(
    "the share of selected tokens chosen by exact attention (1 = exact only, 0 = LSH only)"
)


@attrs.define(kw_only=True)
class HybridSelector(Selector):
    """floor(alpha*k) by ``exact`` + the rest by ``lsh`` among what exact left; global set."""

    name: ClassVar[str] = "hybrid"
    alpha: float = attrs.field(default=0.75, validator=check_alpha)
    exact: str = "exact"
    lsh: str = "lsh"
    redistribute: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))

    def scorer_names(self) -> tuple[str, ...]:
        if self.alpha >= 1:
            return (self.exact,)
        if self.alpha <= 0 and not self.redistribute:
            return (self.lsh,)
        return (self.exact, self.lsh)

    def select(self, source: ScoreSource, candidates: torch.Tensor, k: int) -> torch.Tensor:
        cand = candidates.to(torch.bool)
        if not bool((cand == cand[:1, :1]).all()):
            raise ConfigError("hybrid selector keeps one global set; candidates must not differ")
        cand = cand[:1, :1]
        n = cand.shape[-1]
        primary = math.floor(self.alpha * k + 1e-9)
        # masks and indices live on the scores' device (the model's): no host transfer
        taken = torch.zeros(1, 1, n, dtype=torch.bool)
        parts: list[torch.Tensor] = []

        def take(idx: torch.Tensor) -> None:
            nonlocal taken, cand
            taken, cand = taken.to(idx.device), cand.to(idx.device)
            taken[0, 0, idx[0, 0]] = True
            parts.append(idx[0, 0])

        exact_scores = None
        if primary > 0:
            exact_scores = reduce_scores(source.scores(self.exact, cand), "global")
            take(topk_candidates(exact_scores, cand, primary))
        rest = k - primary
        if rest > 0:
            remaining = cand & ~taken.to(cand.device)
            lsh = reduce_scores(source.scores(self.lsh, remaining), "global")
            share = rest
            if self.redistribute:
                merit = remaining.to(lsh.device) & (lsh > 0)
                share = min(rest, int(merit.sum()))  # one host read per step
            if share > 0:
                take(topk_candidates(lsh, remaining, share))
            if share < rest:  # redistribute: exact's next best fill the LSH shortfall
                if exact_scores is None:
                    exact_scores = reduce_scores(source.scores(self.exact, cand), "global")
                left = cand.to(taken.device) & ~taken
                take(topk_candidates(exact_scores, left, rest - share))
        if not parts:
            return torch.empty(1, 1, 0, dtype=torch.long)
        # the parts are disjoint: their sorted union is the kept set, without a nonzero() sync
        return torch.cat(parts).sort().values.view(1, 1, -1)


@hookimpl
def kvlab_selectors() -> list[type]:
    return [HybridSelector]
