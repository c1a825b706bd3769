"""The ``observation_window`` budgeter: protect the context slots inside a trailing query window.

SnapKV-style scorers observe the last ``window`` rows of the forward input. With the question
appended those rows are (mostly) question rows; whatever context tokens still fall inside the
window are kept unconditionally, and the rest of the budget goes to the best-scored context tokens
before the window. The budget ``C`` counts the protected context slots, so a policy ends with
exactly ``floor(keep_ratio * L)`` (or ``budget``) context tokens like every other policy.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

from kvpress_lab.hookspecs import hookimpl
from kvpress_lab.interfaces import Allocation, Budgeter, StepLayout
from kvpress_lab.policy import budget_tokens
from kvpress_lab.validators import check_keep_ratio, positive_int


@attrs.define(kw_only=True)
class ObservationWindowBudgeter(Budgeter):
    """Keep ``C`` context tokens: the context slots among the last ``window`` input rows, plus
    ``C - W_ctx`` candidates before them.

    ``W_ctx = min(max(0, window - n_question), block length, C)``: the number of context tokens of
    the current block that sit inside the trailing window of the forward input (block + question).
    """

    name: ClassVar[str] = "observation_window"
    keep_ratio: float | None = attrs.field(default=1.0, validator=check_keep_ratio)
    budget: int | None = attrs.field(default=None, validator=positive_int)
    window: int = attrs.field(default=32, validator=positive_int)

    def target_tokens(self, context_length: int) -> int:
        return budget_tokens(context_length, self.keep_ratio, self.budget)

    def window_context_slots(self, layout: StepLayout, keep: int) -> int:
        """Context slots of the current block inside the trailing observation window."""
        block_len = layout.block_end - layout.block_start
        return min(max(0, self.window - layout.n_question), block_len, keep)

    def allocate(self, layout: StepLayout) -> Allocation:
        ctx = ~layout.question_mask
        n_ctx = int(ctx[0, 0].sum())
        keep = min(n_ctx, self.target_tokens(layout.context_length))
        if keep >= n_ctx:
            return Allocation.keep_all(layout)
        w_ctx = self.window_context_slots(layout, keep)
        # context slots are in original order, so the window's context slots are the last ones
        rank = torch.cumsum(ctx.to(torch.long), dim=-1) - 1
        protected = ctx & (rank >= n_ctx - w_ctx)
        return Allocation(protected=protected, candidates=ctx & ~protected, k=keep - w_ctx)


@hookimpl
def kvlab_budgeters() -> list[type]:
    return [ObservationWindowBudgeter]
