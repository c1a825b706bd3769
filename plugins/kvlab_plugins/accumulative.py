"""The ``accumulative`` budgeter: LASER-KV's block-wise budget, anchors and look-back tail.

LASER-KV (Sood, Sharma, Agrawal, "More Than a Quick Glance: Overcoming the Greedy Bias in
KV-Cache Compression", arXiv 2602.02199) prefills the context in blocks of ``S`` tokens and keeps
a compressed cache ``A`` that only grows. With keep ratio ``r`` and context length ``L``:

- per-block budget ``B = floor(2 r S L / (S + L))`` ("accumulate" mode, capped at ``floor(r L)``
  below) or ``B = floor(r L)`` ("recursive" mode);
- anchors ``a = B // n`` (the first ``a`` tokens of the context), local window ``w = B // n`` (the
  last ``w`` tokens of every block) and long-term pool ``G = B - 2 (B // n)`` selected per block.

The budgeter is stateless: it rebuilds ``A``, the previous block's tail ``T`` and the anchors from
``layout.context_index`` and the block bounds on every call, so nothing leaks from one input to
the next (the reference code kept ``T`` on the engine object between calls).

Allocation for block ``t`` (past slots = what earlier steps kept):

accumulate, look-back on (the paper's method)
    protected = anchors, every past slot that is not the previous tail (that is ``A``), and the
    block's last ``w`` tokens (they become the next ``T``); candidates = the previous tail ``T``
    plus the block's tokens that are neither anchors nor in its last ``w``; ``k = min(G, #cand)``
    (capped by the schedule below).
    ``T`` is therefore re-scored together with the next block and either joins ``A`` or is dropped.
    In the final block the block's last ``w`` are protected and stay: ``A <- A + T``.
accumulate, look-back off
    As in the reference code's ``boundary_smoothing=False``: a non-final block's last ``w``
    tokens are neither protected nor candidates, so they are dropped right after the block and
    the next block neither sees nor re-scores them; only the final block's tail is kept. Past
    slots are all ``A`` and protected. The final kept count is the same as with look-back on, so
    the ablation compares methods at the same budget.
recursive
    past = ``A`` only; protected = anchors and the block's last ``w``; candidates = every other
    context slot (all of ``A`` except anchors, plus the block's other tokens); ``A`` is rebuilt
    to at most ``B`` tokens after every block, so memory is bounded at ``B + S + Q``.

Where kvpress-lab departs from the paper's arithmetic (so that ``laserkv`` keeps exactly the
policy-independent target ``floor(r L)``, or ``budget``, like every other policy):

- the per-block budget is capped at the target, ``B = min(floor(2 r S L / (S + L)), floor(r L))``.
  The cap only binds when the context fits in one block (``L <= S``, where the paper's ``B`` is
  larger than ``r L``). The paper keeps the whole context when ``L <= B`` (e.g. ``r=0.75,
  L=2048, S=4096``: ``B = 2048``, 100 % kept while every other policy keeps 75 %); here that
  happens only at ``r = 1`` (or a ``budget >= L``);
- accumulate mode follows the paper's own schedule, ``a + w + G * x / S`` tokens after ``x``
  context tokens (which reaches about ``r L`` at ``x = L``), scaled so it ends at the target: the
  cache after the block ending at ``x`` holds at most ``floor(target * (a + w + G x / S) /
  (a + w + G L / S))`` tokens. When the paper's schedule undershoots (``L`` a multiple of ``S``:
  ``B`` rounded down) the cap never binds; when it overshoots (a short last block, or ``a`` and
  ``w`` rounded down so ``G > B / 2``) every block gives up its share of the excess instead of the
  last block overflowing (``L=200, S=48, r=0.3``: ``G`` in every block ends at 62 tokens, the
  scaled schedule at 60);
- the last block's selection is sized so the cache ends at exactly the target (``k`` can exceed
  ``G`` there): ``L=32768, S=4096, r=0.25`` keeps ``G + 2`` in its last block so the total is
  8192 rather than 8190, and ``L=4850, S=4096, r=0.25`` keeps 1212 tokens (25 %) where ``G`` in
  both blocks would keep 1666 (34 %). In recursive mode the same rule fills the cache to
  ``B = floor(r L)`` at the end.

Fixes over the reference code: a final block not longer than ``w`` still offers the previous
tail ``T`` as candidates (the reference skipped selection when the block had no candidates of
its own and silently dropped ``T``), and no state is carried between calls.

``keep_ratio=1`` (or a ``budget`` of at least ``L``) keeps every token, exactly like the ``full``
policy. (The formula alone would not: at ``r=1`` ``B = 2SL/(S+L) < L`` whenever ``L > S``.)
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import attrs

from kvpress_lab.errors import ConfigError
from kvpress_lab.hookspecs import hookimpl
from kvpress_lab.interfaces import Allocation, Budgeter, StepLayout
from kvpress_lab.policy import budget_tokens
from kvpress_lab.validators import check_keep_ratio, int_at_least, positive_int

__all__ = ["AccumulativeBudgeter", "BlockBudget", "check_divisor"]

Mode = Literal["accumulate", "recursive"]


check_divisor = int_at_least(
    2,
    "anchors and the local window each take B // n of the per-block budget B, so n <= 1 leaves "
    "no room for selected tokens",
)


@attrs.frozen
class BlockBudget:
    """The resolved budget for one context length."""

    per_block: int  # B
    anchors: int  # a = B // n
    window: int  # w = B // n
    pool: int  # G = B - 2 (B // n)
    keep_all: bool  # nothing is compressed (keep_ratio 1 or budget >= L)
    target: int  # context tokens kept at the end: floor(r L) or the budget


@attrs.define(kw_only=True)
class AccumulativeBudgeter(Budgeter):
    """LASER-KV's block budget: anchors + per-block selection + the block's local tail.

    Args:
        keep_ratio: fraction r of context tokens kept, in (0, 1].
        budget: tokens kept instead of a ratio (used as ``r = budget / L``).
        block_size: S, the block length the budget formula assumes (the engine's block size).
        protection_divisor: n > 1; anchors and window are ``B // n`` each.
        mode: "accumulate" (append-only A, the paper's method) or "recursive" (A rebuilt, bounded).
        lookback: re-score the previous block's tail with the next block (accumulate mode).
    """

    name: ClassVar[str] = "accumulative"
    keep_ratio: float | None = attrs.field(default=0.25, validator=check_keep_ratio)
    budget: int | None = attrs.field(default=None, validator=positive_int)
    block_size: int = attrs.field(default=4096, validator=positive_int)
    protection_divisor: int = attrs.field(default=4, validator=check_divisor)
    mode: Mode = attrs.field(
        default="accumulate", validator=attrs.validators.in_(("accumulate", "recursive"))
    )
    lookback: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))

    # ---- budget arithmetic -------------------------------------------------------------------
    def _ratio(self, context_length: int) -> float:
        if self.budget is not None:
            return min(1.0, self.budget / max(1, context_length))
        return 1.0 if self.keep_ratio is None else float(self.keep_ratio)

    def block_budget(self, context_length: int) -> BlockBudget:
        """B, a, w, G and the final target for a context of ``context_length`` tokens.

        No validation here (see :meth:`validate`).
        """
        L, S, n = context_length, self.block_size, self.protection_divisor
        target = self.final_tokens(L)
        if self.mode == "accumulate":
            r = self._ratio(L)
            # the epsilon keeps e.g. 2*0.25*32*96/128 = 12 from flooring to 11 through float error
            paper = math.floor(2 * r * S * L / (S + L) + 1e-9)
            per_block = min(paper, target)  # binds only when L <= S (one block; module doc)
        else:
            per_block = target
        anchors = window = per_block // n
        pool = per_block - 2 * (per_block // n)
        return BlockBudget(per_block, anchors, window, pool, target >= L, target)

    def final_tokens(self, context_length: int) -> int:
        """The policy-independent target: ``floor(r L)`` or ``budget`` (``budget_tokens``)."""
        return budget_tokens(context_length, self.keep_ratio, self.budget)

    def validate(self, context_length: int) -> None:
        bb = self.block_budget(context_length)
        if bb.keep_all:
            return
        if bb.pool <= 0:
            what = (
                f"keep_ratio={self.keep_ratio}"
                if self.budget is None
                else f"budget={self.budget} (r={self._ratio(context_length):.4g})"
            )
            formula = (
                "B = min(floor(2*r*S*L/(S+L)), floor(r*L))"
                if self.mode == "accumulate"
                else "B = floor(r*L)"
            )
            raise ConfigError(
                f"{self.name} budget leaves no selected tokens: {what}, block_size={self.block_size}, "
                f"protection_divisor={self.protection_divisor}, context L={context_length} tokens "
                f"give {formula} = {bb.per_block}, anchors a = B//n = {bb.anchors}, window "
                f"w = B//n = {bb.window}, pool G = B - 2*(B//n) = {bb.pool} <= 0; raise keep_ratio "
                "or block_size, or use a larger protection_divisor"
            )

    def target_tokens(self, context_length: int) -> int:
        """Context tokens kept at the end: the plain target ``floor(r L)`` (or ``budget``).

        The allocation below is built to land on it; tests check that by running the engine.
        """
        return self.final_tokens(context_length)

    def schedule_cap(self, bb: BlockBudget, context_length: int, block_end: int) -> int:
        """Most tokens the cache may hold after the block ending at ``block_end`` (accumulate).

        The paper's schedule ``a + w + G * x / S`` after ``x`` context tokens, scaled so that it
        ends at the target at ``x = L``; integer arithmetic, floored.
        """
        S, L = self.block_size, context_length
        fixed = (bb.anchors + bb.window) * S
        end = fixed + bb.pool * L
        return min(bb.target, bb.target * (fixed + bb.pool * block_end) // max(1, end))

    def reachable_floor(self, bb: BlockBudget, layout: StepLayout) -> int:
        """Fewest tokens the cache must hold after a non-last block so the target stays reachable.

        Later blocks can add at most their own tokens, less (look-back off) the tail every later
        non-last block drops unseen.
        """
        S = self.block_size
        left = layout.context_length - layout.block_end
        if not self.lookback:
            left -= max(0, layout.n_blocks - layout.block_index - 2) * min(bb.window, S)
        return bb.target - left

    # ---- allocation --------------------------------------------------------------------------
    def allocate(self, layout: StepLayout) -> Allocation:
        bb = self.block_budget(layout.context_length)
        if bb.keep_all:
            return Allocation.keep_all(layout)
        ci = layout.context_index[:1, :1]  # one global set: every layer/head holds the same slots
        ctx = ci >= 0
        b0, b1 = layout.block_start, layout.block_end
        in_block = (ci >= b0) & (ci < b1)
        past = ctx & ~in_block
        anchors = ctx & (ci < bb.anchors)
        tail = in_block & (ci >= b1 - bb.window) & ~anchors
        rest_of_block = in_block & ~anchors & ~tail

        if self.mode == "recursive":
            protected = anchors | tail
            candidates = ctx & ~protected
        elif self.lookback:
            # T: what the previous block protected as its tail (w < S in accumulate mode)
            prev_tail = past & (ci >= b0 - bb.window) & ~anchors
            protected = anchors | (past & ~prev_tail) | tail
            candidates = prev_tail | rest_of_block
        else:
            protected = anchors | past
            if layout.is_last_block:
                protected = protected | tail
            candidates = rest_of_block
        n_cand = int(candidates.sum())
        n_protected = int(protected.sum())
        if layout.is_last_block:
            # the last block lands the cache exactly on the target (see module doc)
            k = bb.target - n_protected
        elif self.mode == "accumulate":
            # G per block, never above the paper's schedule scaled to end at the target, and never
            # so few that the target is out of reach (see module doc)
            cap = self.schedule_cap(bb, layout.context_length, b1)
            if not self.lookback:
                cap -= min(bb.window, self.block_size)  # the tail the schedule counts is dropped
            k = min(bb.pool, cap - n_protected)
            k = max(k, self.reachable_floor(bb, layout) - n_protected)
        else:
            k = bb.per_block - n_protected  # A rebuilt to B (= G unless w > S)
        return Allocation(protected=protected, candidates=candidates, k=max(0, min(n_cand, k)))


@hookimpl
def kvlab_budgeters() -> list[type]:
    return [AccumulativeBudgeter]
