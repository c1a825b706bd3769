"""Validation of what plugins hand the engine, before any of it touches the cache.

A budgeter's :class:`~kvpress_lab.interfaces.Allocation`, a selector's indices or mask and a
scorer's scores are checked for type, dtype, shape, range, duplicates and the exact per-row (or,
for a selector that pools heads, per-layer) counts the allocation asks for. A bad value raises :class:`~kvpress_lab.errors.PluginError` naming the plugin that
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

__all__ = [
    "check_allocation",
    "check_prompt_fits",
    "check_scores",
    "check_selection",
    "equal_counts",
]


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
    if isinstance(k, torch.Tensor):
        _check_counts_tensor(k, layout, name)
    elif isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise PluginError(
            f"{name} returned k={k!r} ({type(k).__name__}); expected an int >= 0 or a long "
            f"tensor [1 or {layout.context_index.shape[0]} layers, 1 or "
            f"{layout.context_index.shape[1]} KV heads] of counts"
        )
    elif k < 0:
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
    if isinstance(k, torch.Tensor):
        n_cand = candidates.sum(-1)
        over = allocation.counts(layout) > n_cand
        if bool(over.any()):
            layer, head = (int(v) for v in over.nonzero()[0])
            raise PluginError(
                f"{name} asked to keep {int(allocation.counts(layout)[layer, head])} of only "
                f"{int(n_cand[layer, head])} candidates at layer {layer}, KV head {head}"
            )
        return
    n_cand = int(candidates.sum(-1).min())
    if k > n_cand:
        raise PluginError(f"{name} asked to keep {k} of only {n_cand} candidates")


def _check_counts_tensor(k: torch.Tensor, layout: StepLayout, name: str) -> None:
    """A per-layer / per-head ``k``: long [Ly|1, H|1], values >= 0."""
    ly, h = layout.context_index.shape[:2]
    want = f"[1 or {ly} layers, 1 or {h} KV heads]"
    if k.dtype == torch.bool or k.dtype.is_floating_point or k.is_complex():
        raise PluginError(
            f"{name} returned k of dtype {str(k.dtype).removeprefix('torch.')}; expected a long "
            f"tensor {want} of counts"
        )
    if k.dim() != 2 or not all(s in (1, f) for s, f in zip(k.shape, (ly, h), strict=True)):
        raise PluginError(f"{name} returned k of shape {tuple(k.shape)}; expected {want}")
    if k.numel() and int(k.min()) < 0:
        raise PluginError(
            f"{name} asked to keep k={int(k.min())} candidates in some row; counts must be >= 0"
        )


def check_selection(
    allocation: Allocation,
    selected: object,
    layout: StepLayout,
    who: str,
    pools_heads: bool = False,
) -> torch.Tensor:
    """Check a selector's choice and return the step's keep mask ``protected | selected``.

    ``who`` names the selector. Long indices must be slot numbers in ``[0, n_slots)``, distinct
    within a row, all candidates, ``k`` per row (possible only when every row's count is the
    same). A bool mask ``[Ly|1, H|1, N]`` must select only candidates, each row exactly its count
    of the allocation, or, when the selector ``pools_heads``, each layer the sum of its heads'
    counts (heads may then differ).
    """
    name = f"selector {who!r}"
    k = allocation.k
    if isinstance(selected, torch.Tensor) and selected.dtype == torch.bool:
        return _check_mask(allocation, selected, layout, name, pools_heads)
    if isinstance(k, torch.Tensor):
        counts = allocation.counts(layout)
        if isinstance(selected, torch.Tensor) and selected.dim() == 3:
            if not bool((counts == selected.shape[-1]).all()):
                raise PluginError(
                    f"{name} returned {selected.shape[-1]} indices per row, but the allocation "
                    f"asks for {int(counts.min())} to {int(counts.max())} per row; return a bool "
                    "mask [Ly|1, H|1, N] when rows keep different counts"
                )
            allocation = Allocation(allocation.protected, allocation.candidates, selected.shape[-1])
            k = allocation.k
    if not isinstance(selected, torch.Tensor):
        raise PluginError(
            f"{name} returned {type(selected).__name__}; expected a long tensor "
            f"{_shape_text(layout, k)} of slot indices"
        )
    if selected.dtype.is_floating_point or selected.is_complex():
        raise PluginError(
            f"{name} returned indices of dtype {str(selected.dtype).removeprefix('torch.')}; "
            "expected integer (long) slot indices or a bool mask of the selected slots"
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


def _check_mask(
    allocation: Allocation,
    selected: torch.Tensor,
    layout: StepLayout,
    name: str,
    pools_heads: bool,
) -> torch.Tensor:
    """A bool selection mask: candidates only, exact counts per row (or per layer when pooled).

    Checked at the full ``[Ly, H, N]`` shape on the host (one copy per step).
    """
    if (
        selected.dim() != 3
        or selected.shape[-1] != layout.n_slots
        or not _lead_ok(selected.shape, layout)
    ):
        raise PluginError(
            f"{name} returned a mask of shape {tuple(selected.shape)}; expected "
            f"{_shape_text(layout, layout.n_slots)}"
        )
    sel = _expand(selected, layout)
    cand = _expand(allocation.candidates, layout)
    stray = sel & ~cand
    if bool(stray.any()):
        raise PluginError(
            f"{name} selected {int(stray.sum())} slot(s) that are not candidates (first at "
            f"{_where(stray.any(-1))}); select only candidate slots"
        )
    got = sel.sum(-1)  # [Ly, H]
    want = allocation.counts(layout)
    if pools_heads:
        got_l, want_l = got.sum(-1), want.sum(-1)
        bad = (got_l != want_l).nonzero()
        if bad.numel():
            layer = int(bad[0, 0])
            raise PluginError(
                f"{name} pools its budget across KV heads but selected {int(got_l[layer])} "
                f"slots in layer {layer}, where the allocation asks for {int(want_l[layer])} "
                "(the sum of that layer's per-head counts); select exactly the layer's total"
            )
    else:
        bad = (got != want).nonzero()
        if bad.numel():
            layer, head = (int(v) for v in bad[0])
            raise PluginError(
                f"{name} selected {int(got[layer, head])} slots in layer {layer}, KV head "
                f"{head}, where the allocation asks for {int(want[layer, head])}; select "
                "exactly each row's count (or declare pools_heads = True to redistribute a "
                "layer's budget among its heads)"
            )
    return _expand(allocation.protected, layout) | sel


def equal_counts(keep: torch.Tensor) -> bool:
    """Whether a keep mask ``[Ly', H', N]`` keeps the same number of slots in every row."""
    counts = keep.sum(-1)
    return bool((counts == counts.flatten()[0]).all())


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
