"""Per-layer and per-head allocations at the interface: counts, top-k masks and their checks.

Hand-built layouts and scores, exact expected masks; the engine's checks refuse every selection
that breaks the allocation's counts, naming the selector, the layer and the counts.
"""

from __future__ import annotations

import pytest
import torch

from kvpress_lab.engine.checks import check_allocation, check_selection, equal_counts
from kvpress_lab.errors import PluginError
from kvpress_lab.interfaces import Allocation, StepLayout
from kvpress_lab.selection import topk_candidates


def _layout(layers=2, heads=2, n_ctx=6, n_q=2) -> StepLayout:
    index = torch.cat([torch.arange(n_ctx), torch.full((n_q,), -1)]).expand(layers, heads, -1)
    return StepLayout(
        context_length=n_ctx, block_index=0, n_blocks=1, block_start=0, block_end=n_ctx,
        n_past=0, n_question=n_q, context_index=index,
    )  # fmt: skip


def _allocation(layout: StepLayout, k) -> Allocation:
    ctx = ~layout.question_mask
    protected = ctx.clone()
    protected[..., 1:] = False  # slot 0 protected everywhere
    return Allocation(protected=protected, candidates=ctx & ~protected, k=k)


def test_counts_broadcast_an_int_a_per_layer_and_a_per_head_k():
    layout = _layout()
    assert _allocation(layout, 2).counts(layout).tolist() == [[2, 2], [2, 2]]
    assert _allocation(layout, torch.tensor([[1], [3]])).counts(layout).tolist() == [
        [1, 1],
        [3, 3],
    ]
    per_head = _allocation(layout, torch.tensor([[0, 5], [2, 1]]))
    assert per_head.counts(layout).tolist() == [[0, 5], [2, 1]]
    assert per_head.kept_counts(layout).tolist() == [[1, 6], [3, 2]]  # + the protected sink
    assert per_head.per_row and per_head.selects
    assert not _allocation(layout, torch.zeros(1, 1, dtype=torch.long)).selects


def test_topk_with_per_row_counts_gives_each_rows_best_candidates():
    # slot scores: row (l, h) prefers slots in a different order
    scores = torch.tensor(
        [
            [[9, 1, 2, 3, 4, 5, 0, 0], [9, 5, 4, 3, 2, 1, 0, 0]],
            [[9, 1, 5, 2, 4, 3, 0, 0], [9, 3, 3, 1, 1, 2, 0, 0]],
        ],
        dtype=torch.float32,
    )
    layout = _layout()
    candidates = _allocation(layout, 0).candidates  # slots 1..5
    mask = topk_candidates(scores, candidates, torch.tensor([[1, 3], [2, 0]]))
    assert mask.dtype == torch.bool and mask.shape == (2, 2, 8)
    kept = [[row.nonzero().flatten().tolist() for row in layer] for layer in mask]
    # slot 0 scores 9 but is not a candidate; question slots 6, 7 never are
    assert kept == [[[5], [1, 2, 3]], [[2, 4], []]]
    # one score row for the model, per-layer counts: the mask gets the counts' rows
    mask = topk_candidates(scores[:1, :1], candidates[:1, :1], torch.tensor([[2], [4]]))
    assert mask.shape == (2, 1, 8)
    assert [row.nonzero().flatten().tolist() for row in mask[:, 0]] == [[4, 5], [2, 3, 4, 5]]
    # an int k is unchanged: sorted indices
    assert topk_candidates(scores, candidates, 2)[0, 1].tolist() == [1, 2]


def test_check_allocation_accepts_per_row_counts_and_uneven_protected_sets():
    layout = _layout()
    check_allocation(_allocation(layout, torch.tensor([[1], [5]])), layout, "b")
    uneven = _allocation(layout, 1)
    protected = uneven.protected.clone()
    protected[1, 0, 1] = True
    check_allocation(Allocation(protected, uneven.candidates & ~protected, 1), layout, "b")
    with pytest.raises(
        PluginError, match=r"^budgeter 'b' asked to keep 6 of only 5 candidates at layer 1, KV"
    ):
        check_allocation(_allocation(layout, torch.tensor([[1], [6]])), layout, "b")
    with pytest.raises(PluginError, match=r"^budgeter 'b' asked to keep k=-1 candidates in some"):
        check_allocation(_allocation(layout, torch.tensor([[1, -1]])), layout, "b")
    with pytest.raises(PluginError, match=r"^budgeter 'b' returned k of shape \(2, 2, 1\)"):
        check_allocation(_allocation(layout, torch.ones(2, 2, 1, dtype=torch.long)), layout, "b")


def _mask(rows: list[list[list[int]]], n=8) -> torch.Tensor:
    out = torch.zeros(len(rows), len(rows[0]), n, dtype=torch.bool)
    for layer, heads in enumerate(rows):
        for head, slots in enumerate(heads):
            out[layer, head, slots] = True
    return out


def test_mask_selection_must_keep_each_rows_count():
    layout = _layout()
    alloc = _allocation(layout, torch.tensor([[1, 2], [3, 0]]))
    good = _mask([[[5], [1, 4]], [[1, 2, 3], []]])
    keep = check_selection(alloc, good, layout, "sel")
    assert keep.sum(-1).tolist() == [[2, 3], [4, 1]]  # + the protected sink everywhere
    assert not equal_counts(keep)
    short = _mask([[[5], [1, 4]], [[1, 2], []]])
    with pytest.raises(
        PluginError,
        match=r"^selector 'sel' selected 2 slots in layer 1, KV head 0, where the allocation "
        r"asks for 3; select exactly each row's count \(or declare pools_heads",
    ):
        check_selection(alloc, short, layout, "sel")
    stray = _mask([[[0], [1, 4]], [[1, 2, 3], []]])  # slot 0 is protected, not a candidate
    with pytest.raises(
        PluginError, match=r"^selector 'sel' selected 1 slot\(s\) that are not candidates"
    ):
        check_selection(alloc, stray, layout, "sel")
    with pytest.raises(PluginError, match=r"^selector 'sel' returned a mask of shape \(2, 2, 7\)"):
        check_selection(alloc, good[..., :7], layout, "sel")


def test_pooled_selection_keeps_each_layers_total():
    layout = _layout()
    alloc = _allocation(layout, 2)  # 2 per head: 4 per layer to share among its 2 heads
    pooled = _mask([[[1, 2, 3], [5]], [[], [1, 2, 3, 4]]])
    keep = check_selection(alloc, pooled, layout, "ada", pools_heads=True)
    assert keep.sum(-1).tolist() == [[4, 2], [1, 5]]
    with pytest.raises(
        PluginError,
        match=r"^selector 'sel' selected 3 slots in layer 0, KV head 0, where the allocation "
        r"asks for 2",
    ):
        check_selection(alloc, pooled, layout, "sel")  # not declared: per-row counts
    over = _mask([[[1, 2, 3], [5]], [[1], [1, 2, 3, 4]]])
    with pytest.raises(
        PluginError,
        match=r"^selector 'ada' pools its budget across KV heads but selected 5 slots in layer "
        r"1, where the allocation asks for 4",
    ):
        check_selection(alloc, over, layout, "ada", pools_heads=True)


def test_indices_are_accepted_for_per_row_counts_only_when_the_counts_agree():
    layout = _layout()
    idx = torch.tensor([[[1, 2]]])
    keep = check_selection(_allocation(layout, torch.tensor([[2]])), idx, layout, "sel")
    assert keep.sum(-1).tolist() == [[3, 3], [3, 3]]
    with pytest.raises(
        PluginError,
        match=r"^selector 'sel' returned 2 indices per row, but the allocation asks for 1 to 3 "
        r"per row; return a bool mask",
    ):
        check_selection(_allocation(layout, torch.tensor([[1], [3]])), idx, layout, "sel")
