"""The ``accumulative`` budgeter: LASER-KV's block-wise budget, anchors and look-back tail.

LASER-KV (Sood, Sharma, Agrawal, "More Than a Quick Glance: Overcoming the Greedy Bias in
KV-Cache Compression", arXiv 2602.02199) prefills the context in blocks of ``S`` tokens and keeps
a compressed cache ``A`` that only grows. With keep ratio ``r`` and context length ``L``:

- per-block budget ``B = floor(2 r S L / (S + L))`` ("accumulate" mode) or ``B = floor(r L)``
  ("recursive" mode);
- anchors ``a = B // n`` (the first ``a`` tokens of the context), local window ``w = B // n`` (the
  last ``w`` tokens of every block) and long-term pool ``G = B - 2 (B // n)`` selected per block.

The budgeter is stateless: it rebuilds ``A``, the previous block's tail ``T`` and the anchors from
``layout.context_index`` and the block bounds on every call, so nothing leaks from one input to
the next (the reference code kept ``T`` on the engine object between calls).

Allocation for block ``t`` (past slots = what earlier steps kept):

accumulate, look-back on (the paper's method)
    protected = anchors, every past slot that is not the previous tail (that is ``A``), and the
    block's last ``w`` tokens (they become the next ``T``); candidates = the previous tail ``T``
    plus the block's tokens that are neither anchors nor in its last ``w``; ``k = min(G, #cand)``.
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

The last block's selection is sized so the final cache holds exactly the plain budget
``floor(r L)`` (``budget_tokens``) whenever it has enough candidates, instead of a fixed ``G``.
With ``L`` a multiple of ``S`` this only absorbs the rounding of ``B`` (e.g. ``L=32768, S=4096,
r=0.25``: the last block keeps ``G + 2`` so the total is 8192 rather than 8190); with a short
last block it stops the cache from overshooting (``L=4850, S=4096, r=0.25``: ``G`` in both blocks
would keep 1666 tokens = 34 %, the top-up keeps 1212 = 25 %), so ``laserkv`` ends with the same
token count as every other policy at the same ``keep_ratio``. In recursive mode the same rule
fills the cache to ``B = floor(r L)`` at the end.

Fixes over the reference code: a final block not longer than ``w`` still offers the previous
tail ``T`` as candidates (the reference skipped selection when the block had no candidates of
its own and silently dropped ``T``), and no state is carried between calls.

``keep_ratio=1`` (or a ``budget`` of at least ``L``) keeps every token, exactly like the ``full``
policy, and so does a short context with ``L <= B``. (The formula alone would not: at ``r=1``
``B = 2SL/(S+L) < L`` whenever ``L > S``.)
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import attrs
import torch

from kvpress_lab.errors import ConfigError
from kvpress_lab.hookspecs import hookimpl
from kvpress_lab.interfaces import Allocation, Budgeter, StepLayout
from kvpress_lab.policy import budget_tokens, check_keep_ratio, positive_int

__all__ = ["AccumulativeBudgeter", "BlockBudget", "check_divisor"]

Mode = Literal["accumulate", "recursive"]


def check_divisor(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    """attrs validator: the protection divisor n must be an integer > 1."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 1:
        raise ConfigError(
            f"{attribute.name}={value!r} is invalid: it must be an integer > 1 (anchors and the "
            "local window each take B // n of the per-block budget B, so n <= 1 leaves no room "
            "for selected tokens)"
        )


@attrs.frozen
class BlockBudget:
    """The resolved budget for one context length."""

    per_block: int  # B
    anchors: int  # a = B // n
    window: int  # w = B // n
    pool: int  # G = B - 2 (B // n)
    keep_all: bool  # nothing is compressed (keep_ratio 1, budget >= L, or L <= B)


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
        """B, a, w, G for a context of ``context_length`` tokens (no validation)."""
        L, S, n = context_length, self.block_size, self.protection_divisor
        r = self._ratio(L)
        if self.mode == "accumulate":
            # integer numerator/denominator where possible so e.g. 2*0.25*32*96/128 gives 12
            per_block = math.floor(2 * r * S * L / (S + L) + 1e-9)
        else:
            per_block = math.floor(r * L + 1e-9)
        anchors = window = per_block // n
        pool = per_block - 2 * (per_block // n)
        keep_all = r >= 1.0 or L <= per_block
        return BlockBudget(per_block, anchors, window, pool, keep_all)

    def final_tokens(self, context_length: int) -> int:
        """The plain budget the last block tops the cache up to: ``budget_tokens(L, r, budget)``."""
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
            formula = "B = floor(2*r*S*L/(S+L))" if self.mode == "accumulate" else "B = floor(r*L)"
            raise ConfigError(
                f"{self.name} budget leaves no selected tokens: {what}, block_size={self.block_size}, "
                f"protection_divisor={self.protection_divisor}, context L={context_length} tokens "
                f"give {formula} = {bb.per_block}, anchors a = B//n = {bb.anchors}, window "
                f"w = B//n = {bb.window}, pool G = B - 2*(B//n) = {bb.pool} <= 0; raise keep_ratio "
                "or block_size, or use a larger protection_divisor"
            )

    def target_tokens(self, context_length: int) -> int:
        """Exact context tokens kept at the end, from a dry run of :meth:`allocate`."""
        L = context_length
        bb = self.block_budget(L)
        if bb.keep_all or bb.pool <= 0:
            return L
        S = self.block_size
        bounds = [(s, min(s + S, L)) for s in range(0, L, S)]
        kept = torch.empty(0, dtype=torch.long)
        for bi, (b0, b1) in enumerate(bounds):
            index = torch.cat([kept, torch.arange(b0, b1)])
            layout = StepLayout(
                context_length=L,
                block_index=bi,
                n_blocks=len(bounds),
                block_start=b0,
                block_end=b1,
                n_past=int(kept.numel()),
                n_question=0,
                context_index=index.view(1, 1, -1),
            )
            alloc = self.allocate(layout)
            keep = alloc.protected[0, 0].clone()
            cand = torch.nonzero(alloc.candidates[0, 0]).flatten()
            keep[cand[: alloc.k]] = True  # which candidates survive does not change the count
            kept = index[keep]
        return int(kept.numel())

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
        k = min(bb.pool, n_cand)
        if layout.is_last_block:
            # the last block tops the cache up to the plain budget floor(r L) (see module doc)
            k = max(0, min(n_cand, self.final_tokens(layout.context_length) - int(protected.sum())))
        return Allocation(protected=protected, candidates=candidates, k=k)


@hookimpl
def kvlab_budgeters() -> list[type]:
    return [AccumulativeBudgeter]
