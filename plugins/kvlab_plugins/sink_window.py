"""The ``sink_window`` budgeter: a token budget with protected sinks and a recent window.

The building block of the one-shot baselines: ``sinks`` first context tokens and the most recent
``window`` (or ``window_fraction`` of the budget) are protected; the remaining budget goes to the
best-scored candidates.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

from kvpress_lab.hookspecs import hookimpl
from kvpress_lab.interfaces import Allocation, Budgeter, StepLayout
from kvpress_lab.policy import budget_tokens
from kvpress_lab.validators import check_keep_ratio, non_negative_int, positive_int, unit_interval


@attrs.define(kw_only=True)
class SinkWindowBudgeter(Budgeter):
    """Keep ``floor(keep_ratio * L)`` (or ``budget``) context tokens per layer and KV head."""

    name: ClassVar[str] = "sink_window"
    keep_ratio: float | None = attrs.field(default=1.0, validator=check_keep_ratio)
    budget: int | None = attrs.field(default=None, validator=positive_int)
    sinks: int = attrs.field(default=0, validator=non_negative_int)
    window: int = attrs.field(default=0, validator=non_negative_int)
    window_fraction: float | None = attrs.field(
        default=None,
        validator=unit_interval(
            "the share of the budget given to the recent window", optional=True
        ),
    )

    def target_tokens(self, context_length: int) -> int:
        return budget_tokens(context_length, self.keep_ratio, self.budget)

    def protected_window(self, keep: int) -> int:
        if self.window_fraction is not None:
            return int(keep * self.window_fraction)
        return self.window

    def allocate(self, layout: StepLayout) -> Allocation:
        ctx = ~layout.question_mask
        n_ctx = int(ctx[0, 0].sum())
        keep = min(n_ctx, self.target_tokens(layout.context_length))
        if keep >= n_ctx:
            return Allocation.keep_all(layout)
        sinks = min(self.sinks, keep)
        window = min(self.protected_window(keep), keep - sinks)
        # rank of each context slot among context slots, in cache order (= original order)
        rank = torch.cumsum(ctx.to(torch.long), dim=-1) - 1
        protected = ctx & ((rank < sinks) | (rank >= n_ctx - window))
        candidates = ctx & ~protected
        return Allocation(protected=protected, candidates=candidates, k=keep - sinks - window)


@hookimpl
def kvlab_budgeters() -> list[type]:
    return [SinkWindowBudgeter]
