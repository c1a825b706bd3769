"""Validation of what plugins hand the engine, before any of it touches the cache.

A budgeter's :class:`~kvpress_lab.interfaces.Allocation`, a selector's indices and a scorer's
scores are checked for type, dtype, shape, range, duplicates and the equal per-row counts a dense
cache needs. A bad value raises :class:`~kvpress_lab.errors.PluginError` naming the plugin that
produced it, never a torch traceback from deep inside the engine and never a silently smaller
cache (a duplicate index would keep one slot twice, so fewer tokens than the budget).

Host reads: validation has to look at values, so it reads the host, but a constant number of
times per compression step whatever the number of layers and heads (tests/core/test_hot_path.py
counts them): the allocation's masks are built on the host from the step's layout, a selector's
indices come to the host once (one copy per step) and are checked there, and scores are checked
on their device with one scalar read per scorer call. Nothing here runs per layer or per token.
"""

from __future__ import annotations

import numbers

import torch

from kvpress_lab.errors import PluginError
from kvpress_lab.interfaces import Allocation, StepLayout

__all__ = ["check_allocation", "check_prompt_fits", "check_scores", "check_selection"]


def _lead_ok(shape: tuple[int, ...], layout: StepLayout) -> bool:
    """Leading dims [Ly|1, H|1] broadcast against the layout's [Ly, H]."""
    full = layout.context_index.shape[:2]
    return len(shape) == 3 and all(s in (1, f) for s, f in zip(shape[:2], full, strict=True))


def _shape_text(layout: StepLayout, last: int | str) -> str:
    ly, h = layout.context_index.shape[:2]
    return f"[1 or {ly} layers, 1 or {h} KV heads, {last}]"


def _expand(mask: torch.Tensor, layout: StepLayout) -> torch.Tensor:
    return mask.to(torch.bool).cpu().expand_as(layout.context_index)


def _where(row: torch.Tensor) -> str:
    """'layer l, head h' of the first True in a [Ly, H] tensor."""
    layer, head = (int(v) for v in row.nonzero()[0])
    return f"layer {layer}, KV head {head}"


def check_allocation(allocation: object, layout: StepLayout, who: str) -> None:
    """Refuse an allocation the engine cannot apply exactly; ``who`` names the budgeter."""
    name = f"budgeter {who!r}"
    if not isinstance(allocation, Allocation):
        raise PluginError(
            f"{name} returned {type(allocation).__name__}, not an Allocation; return "
            "Allocation(protected=..., candidates=..., k=...)"
        )
    for field in ("protected", "candidates"):
        mask = getattr(allocation, field)
        if not isinstance(mask, torch.Tensor):
            raise PluginError(
                f"{name} returned {field} of type {type(mask).__name__}; expected a bool tensor "
                f"{_shape_text(layout, layout.n_slots)}"
            )
        if mask.dim() != 3 or mask.shape[-1] != layout.n_slots or not _lead_ok(mask.shape, layout):
            raise PluginError(
                f"{name} returned {field} of shape {tuple(mask.shape)}; expected "
                f"{_shape_text(layout, layout.n_slots)}"
            )
        if mask.dtype != torch.bool:
            raise PluginError(
                f"{name} returned {field} of dtype {str(mask.dtype).removeprefix('torch.')}; "
                "expected a bool mask (True = protected / candidate)"
            )
    k = allocation.k
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise PluginError(f"{name} returned k={k!r} ({type(k).__name__}); expected an int >= 0")
    if k < 0:
        raise PluginError(f"{name} asked to keep k={k} candidates; k must be >= 0")
    question = layout.question_mask.cpu()
    protected = _expand(allocation.protected, layout)
    candidates = _expand(allocation.candidates, layout)
    if bool((protected & question).any()):
        raise PluginError(f"{name} protected question slots; the question is never kept")
    if bool((candidates & question).any()):
        raise PluginError(f"{name} marked question slots as candidates; only context slots can be")
    both = protected & candidates
    if bool(both.any()):
        raise PluginError(
            f"{name} marked {int(both.sum(-1).max())} slot(s) both protected and candidate "
            f"(first at {_where(both.any(-1))}); a selected protected slot would be kept once and "
            "the cache would end up smaller than the budget"
        )
    n_protected = protected.sum(-1)
    if not bool((n_protected == n_protected.flatten()[0]).all()):
        raise PluginError(
            f"{name} protected a different number of slots in different layers/heads "
            f"(min {int(n_protected.min())}, max {int(n_protected.max())}); every layer and KV "
            "head must keep the same count so the cache stays a dense tensor"
        )
    n_cand = int(candidates.sum(-1).min())
    if k > n_cand:
        raise PluginError(f"{name} asked to keep {k} of only {n_cand} candidates")


def check_selection(
    allocation: Allocation, selected: object, layout: StepLayout, who: str
) -> torch.Tensor:
    """Check a selector's indices and return the step's keep mask ``protected | selected``.

    ``who`` names the selector. Indices must be integer slot numbers in ``[0, n_slots)``,
    distinct within a row, all candidates, ``k`` per row.
    """
    name = f"selector {who!r}"
    k = allocation.k
    if not isinstance(selected, torch.Tensor):
        raise PluginError(
            f"{name} returned {type(selected).__name__}; expected a long tensor "
            f"{_shape_text(layout, k)} of slot indices"
        )
    if selected.dtype == torch.bool or selected.dtype.is_floating_point or selected.is_complex():
        raise PluginError(
            f"{name} returned indices of dtype {str(selected.dtype).removeprefix('torch.')}; "
            "expected integer (long) slot indices"
        )
    if selected.dim() != 3 or selected.shape[-1] != k or not _lead_ok(selected.shape, layout):
        raise PluginError(
            f"{name} returned shape {tuple(selected.shape)}; expected {_shape_text(layout, k)}"
        )
    lead = torch.broadcast_shapes(
        allocation.protected.shape[:2], allocation.candidates.shape[:2], selected.shape[:2]
    )
    sel = selected.cpu().long().expand(*lead, k)
    if k:
        low, high = int(sel.min()), int(sel.max())
        if low < 0 or high >= layout.n_slots:
            bad = low if low < 0 else high
            raise PluginError(
                f"{name} returned slot index {bad}, outside 0..{layout.n_slots - 1}; indices "
                "must be slots of this step"
            )
        ordered = sel.sort(dim=-1).values
        dup = (ordered[..., 1:] == ordered[..., :-1]).any(-1)
        if bool(dup.any()):
            raise PluginError(
                f"{name} returned the same slot twice in one row ({_where(dup)}); every kept slot "
                "must be distinct, or the cache ends up smaller than the budget"
            )
    protected = allocation.protected.to(torch.bool).cpu().expand(*lead, layout.n_slots)
    cand = allocation.candidates.to(torch.bool).cpu().expand(*lead, layout.n_slots)
    if not bool(cand.gather(-1, sel).all()):
        raise PluginError(f"{name} selected slots that are not candidates")
    keep = protected.clone()
    keep.scatter_(-1, sel, True)
    if bool((keep & layout.question_mask.cpu()[: lead[0], : lead[1]]).any()):
        raise PluginError(f"{name} kept question slots")
    return keep


def check_scores(
    scores: object, candidates: torch.Tensor, layout: StepLayout, who: str
) -> torch.Tensor:
    """Refuse scores that are not a float tensor [Ly|1, H|1, N] finite on every candidate slot.

    ``who`` names the scorer. Non-candidate slots may hold anything (``-inf`` is a common mask).
    """
    name = f"scorer {who!r}"
    if not isinstance(scores, torch.Tensor):
        raise PluginError(
            f"{name} returned {type(scores).__name__}; expected a float tensor "
            f"{_shape_text(layout, layout.n_slots)}"
        )
    if (
        scores.dim() != 3
        or scores.shape[-1] != layout.n_slots
        or not _lead_ok(scores.shape, layout)
    ):
        raise PluginError(
            f"{name} returned shape {tuple(scores.shape)}; expected "
            f"{_shape_text(layout, layout.n_slots)}"
        )
    if not scores.dtype.is_floating_point:
        return scores  # integer scores are always finite
    lead = torch.broadcast_shapes(scores.shape[:2], candidates.shape[:2])
    cand = candidates.to(torch.bool).to(scores.device).expand(*lead, layout.n_slots)
    values = scores.expand(*lead, layout.n_slots)
    if not bool((~values.isfinite() & cand).any()):  # the one host read of a healthy step
        return scores
    for bad, label in ((values.isnan(), "NaN"), (values.isinf(), "inf")):
        hit = bad & cand
        if bool(hit.any()):
            raise PluginError(
                f"{name} returned {label} for {int(hit.sum())} candidate slot(s) (first at "
                f"{_where(hit.any(-1).cpu())}); scores of candidates must be finite numbers"
            )
    return scores


def check_prompt_fits(
    limit: int | None,
    model: str,
    context_tokens: int,
    question_tokens: int,
    max_new_tokens: int,
    fix: str | None = None,
) -> None:
    """Refuse a prompt longer than the model's positions, naming the part to shorten.

    Needs only token counts and the config's limit, so it runs before the weights load. ``fix``
    replaces the default advice (``kvlab compare`` names ``--lengths``, a JSONL file its line);
    ``{room}`` in it becomes the most context tokens that fit.
    """
    from kvpress_lab.errors import ContextTooLongError

    if limit is None:
        return
    rest = question_tokens + max_new_tokens
    total = context_tokens + rest
    if total <= limit:
        return
    if rest >= limit:
        raise ContextTooLongError(
            f"the question ({question_tokens} tokens) + answer ({max_new_tokens}) alone need "
            f"{rest} of {model}'s {limit} positions, leaving none for the context; shorten the "
            "question (or lower --max-new-tokens), or use a model with a longer context"
        )
    room = limit - rest
    raise ContextTooLongError(
        f"context ({context_tokens} tokens) + question ({question_tokens}) + answer "
        f"({max_new_tokens}) = {total} tokens exceeds {model}'s maximum of {limit} positions; "
        + (fix or "shorten the context to at most {room} tokens").replace("{room}", str(room))
        + " or use a model with a longer context"
    )
