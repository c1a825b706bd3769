"""Known-value tests of the baseline plugins on hand-built attention, scores and layouts."""

from __future__ import annotations

import math

import pytest
import torch
from kvlab_plugins.finch import FinchChunkBudgeter, finch_keep_after, finch_layer_scores
from kvlab_plugins.h2o import accumulated_attention, h2o_keep
from kvlab_plugins.observation_window import ObservationWindowBudgeter
from kvlab_plugins.recency import RecencySelector
from kvlab_plugins.sink_window import SinkWindowBudgeter
from kvlab_plugins.snapkv import snapkv_window_scores

from kvpress_lab.errors import ConfigError
from kvpress_lab.interfaces import AttentionBlock, ScoreSource, StepLayout
from kvpress_lab.spec import load_policy


def layout(
    context: int,
    question: int,
    *,
    block: tuple[int, int] | None = None,
    past: list[int] | None = None,
    layers: int = 1,
    heads: int = 1,
    index: int = 0,
    n_blocks: int = 1,
) -> StepLayout:
    b0, b1 = block or (0, context)
    past = past or []
    row = torch.tensor(past + list(range(b0, b1)) + [-1] * question)
    return StepLayout(
        context_length=context,
        block_index=index,
        n_blocks=n_blocks,
        block_start=b0,
        block_end=b1,
        n_past=len(past),
        n_question=question,
        context_index=row.expand(layers, heads, -1).clone(),
    )


class FixedScores(ScoreSource):
    def __init__(self, scores: torch.Tensor) -> None:
        self._scores = scores

    def scores(self, name: str, candidates: torch.Tensor) -> torch.Tensor:
        return self._scores


class FakeObservation:
    """Duck-typed LayerObservation: ``attention(rows)`` slices a hand-built attention tensor.

    ``attn`` holds rows ``first_row..n_rows-1`` of the pass (default: all rows).
    """

    def __init__(
        self, attn: torch.Tensor, n_past: int = 0, question_rows=None, n_rows: int | None = None
    ) -> None:
        self.attn, self.n_past, self.question_rows = attn, n_past, question_rows
        self._n_rows = int(attn.shape[-2]) if n_rows is None else n_rows
        self.first_row = self._n_rows - int(attn.shape[-2])
        self.requests: list[slice] = []

    @property
    def n_rows(self) -> int:
        return self._n_rows

    def observation_rows(self) -> slice:
        return self.question_rows

    @property
    def keys(self) -> torch.Tensor:
        """Stand-in keys: only their shape [B, H, N, 1] is read."""
        b, h, _, _, n = self.attn.shape
        return self.attn.new_zeros(b, h, n, 1)

    def attention(self, rows: slice) -> torch.Tensor:
        self.requests.append(rows)
        assert rows.start >= self.first_row, "asked for rows the hand-built tensor does not hold"
        return self.attn[..., rows.start - self.first_row : rows.stop - self.first_row, :]

    def attention_blocks(self, rows: slice, causal: bool = True, slots=None, max_rows=None):
        """Row chunks of at most ``max_rows`` rows, every head and key (one request each)."""
        step = max_rows or (rows.stop - rows.start)
        h, n = self.attn.shape[1], self.attn.shape[-1]
        for r0 in range(rows.start, rows.stop, step):
            r1 = min(rows.stop, r0 + step)
            whole = r0 == rows.start and r1 == rows.stop
            yield AttentionBlock(
                rows=slice(r0, r1),
                heads=slice(0, h),
                keys=slice(0, n),
                weights=self.attention(slice(r0, r1)),
                complete=whole,
            )


def kept(comp, lay: StepLayout, scores: torch.Tensor | None = None) -> list[list[int]]:
    """Context positions kept by a composition's budgeter + selector on ``lay``."""
    alloc = comp.budgeter.allocate(lay)
    source = FixedScores(scores if scores is not None else torch.zeros(1, 1, lay.n_slots))
    sel = comp.selector.select(source, alloc.candidates.to(torch.bool), alloc.k)
    n_l, n_h = lay.context_index.shape[:2]
    keep = alloc.protected.to(torch.bool).expand(n_l, n_h, -1).clone()
    keep.scatter_(-1, sel.expand(n_l, n_h, -1), True)
    return [[lay.context_index[i, h][keep[i, h]].tolist() for h in range(n_h)] for i in range(n_l)]


# --- SnapKV -------------------------------------------------------------------------------


def snap_attention() -> torch.Tensor:
    """[B=1, H=1, G=2, w=2, N=6]: two window rows (slots 4, 5) of two query heads."""
    attn = torch.zeros(1, 1, 2, 2, 6)
    attn[0, 0, 0, 0, :5] = torch.tensor([0.4, 0.0, 0.2, 0.0, 0.4])
    attn[0, 0, 0, 1, :6] = torch.tensor([0.0, 0.0, 0.1, 0.3, 0.1, 0.5])
    attn[0, 0, 1, 0, :5] = torch.tensor([0.0, 0.6, 0.0, 0.0, 0.4])
    attn[0, 0, 1, 1, :6] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.5, 0.5])
    return attn
    # votes (sum over the 2 rows) before the window: head 0 [.4, 0, .3, .3], head 1 [0, .6, 0, 0]


def test_snapkv_scores_max_pool_by_hand():
    out = snapkv_window_scores(snap_attention(), kernel=3, pooling="max", aggregation="sum")
    # max pool k=3: head 0 [.4, .4, .3, .3], head 1 [.6, .6, .6, 0]; mean of the group
    expected = torch.tensor([[0.5, 0.5, 0.45, 0.15, 0.0, 0.0]])
    torch.testing.assert_close(out, expected)


def test_snapkv_scores_avg_pool_and_mean_by_hand():
    out = snapkv_window_scores(snap_attention(), kernel=3, pooling="avg", aggregation="sum")
    # avg pool k=3 (zero padding counted): head 0 [.4/3, .7/3, .6/3, .6/3], head 1 [.2, .2, .2, 0]
    head0 = torch.tensor([0.4, 0.7, 0.6, 0.6]) / 3
    head1 = torch.tensor([0.2, 0.2, 0.2, 0.0])
    expected = torch.zeros(1, 6)
    expected[0, :4] = (head0 + head1) / 2
    torch.testing.assert_close(out, expected)
    mean = snapkv_window_scores(snap_attention(), kernel=3, pooling="avg", aggregation="mean")
    torch.testing.assert_close(mean, expected / 2)


@pytest.mark.parametrize(("pooling", "expected"), [("max", [0, 1, 4]), ("avg", [1, 2, 4])])
def test_snapkv_keeps_window_context_plus_top_scores(pooling, expected):
    # 5 context tokens + 1 question token, window 2: context token 4 sits inside the window
    policy = load_policy(f"snapkv:budget=3,window=2,kernel=3,pooling={pooling}")
    comp = policy.compose()
    lay = layout(5, 1)
    obs = FakeObservation(snap_attention(), n_rows=6)
    observed = comp.scorers["main"].observe(obs)
    assert obs.requests == [slice(4, 6)]  # the last `window` rows of the input
    scores = comp.scorers["main"].score(lay, [observed], None, None)
    alloc = comp.budgeter.allocate(lay)
    assert alloc.protected[0, 0].tolist() == [False] * 4 + [True, False]
    assert alloc.candidates[0, 0].tolist() == [True] * 4 + [False, False]
    assert alloc.k == 2
    assert kept(comp, lay, scores) == [[expected]]


def test_observation_window_budgeter_counts_window_context_in_the_budget():
    bud = ObservationWindowBudgeter(budget=6, window=5)
    # question of 2 rows: 3 context tokens are in the window
    alloc = bud.allocate(layout(10, 2))
    assert alloc.protected[0, 0].nonzero().flatten().tolist() == [7, 8, 9]
    assert alloc.candidates[0, 0].nonzero().flatten().tolist() == list(range(7))
    assert alloc.k == 3
    # question longer than the window: every context token is a candidate
    alloc = bud.allocate(layout(10, 8))
    assert not bool(alloc.protected.any()) and alloc.k == 6
    # query-agnostic: the trailing window of the context itself
    alloc = bud.allocate(layout(10, 0))
    assert alloc.protected[0, 0].nonzero().flatten().tolist() == [5, 6, 7, 8, 9]
    assert alloc.k == 1


def test_snapkv_rejects_even_kernel():
    with pytest.raises(ConfigError, match="kernel=4 is invalid: the pooling kernel must be an odd"):
        load_policy("snapkv:kernel=4")


# --- H2O ----------------------------------------------------------------------------------


def h2o_attention() -> torch.Tensor:
    """[1, H=1, G=2, 4 rows, 4 keys] causal attention (rows sum to 1)."""
    a = torch.tensor(
        [
            [[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.2, 0.3, 0.5, 0], [0.1, 0.2, 0.3, 0.4]],
            [[1.0, 0, 0, 0], [0.9, 0.1, 0, 0], [0.6, 0.2, 0.2, 0], [0.4, 0.1, 0.1, 0.4]],
        ]
    )
    return a[None, None]


@pytest.mark.parametrize("block", [1, 3, 256])
def test_h2o_scores_sum_every_query_and_the_group(block):
    obs = FakeObservation(h2o_attention())
    out = accumulated_attention(obs, query_block=block)
    # column sums of both query heads' matrices
    expected = torch.tensor([[1.8 + 2.9, 1.0 + 0.4, 0.8 + 0.3, 0.4 + 0.4]])
    torch.testing.assert_close(out, expected)
    assert len(obs.requests) == math.ceil(4 / block)  # never more than `block` rows at once
    assert all(r.stop - r.start <= block for r in obs.requests)


def test_h2o_keep_recent_plus_heavy_hitters():
    scores = torch.tensor([[5.0, 1.0, 4.0, 0.5, 3.0, 2.0, 0.0, 0.0], [0, 1, 2, 3, 4, 5, 6, 7.0]])
    assert h2o_keep(scores, budget=4, recent=2).tolist() == [[0, 2, 6, 7], [4, 5, 6, 7]]
    assert h2o_keep(scores, budget=3, recent=0).tolist() == [[0, 2, 4], [5, 6, 7]]
    assert h2o_keep(scores, budget=8, recent=4).tolist() == [list(range(8))] * 2


def test_h2o_policy_keeps_half_recent_half_heavy_per_head():
    comp = load_policy("h2o:budget=4").compose()
    lay = layout(8, 2, heads=2)
    scores = torch.tensor(
        [[[5.0, 1.0, 4.0, 0.5, 3.0, 2.0, 0.0, 0.0, 9, 9], [0, 1, 2, 3, 4, 5, 6, 7.0, 9, 9]]]
    )
    assert kept(comp, lay, scores) == [[[0, 2, 6, 7], [4, 5, 6, 7]]]


def test_h2o_rejects_bad_recent_fraction():
    with pytest.raises(ConfigError, match=r"recent_fraction=1.5 is invalid: it must be a number"):
        load_policy("h2o:recent_fraction=1.5")


# --- StreamingLLM -------------------------------------------------------------------------


def test_streamingllm_keeps_sinks_and_most_recent():
    comp = load_policy("streamingllm:budget=7").compose()
    assert kept(comp, layout(12, 2)) == [[[0, 1, 2, 3, 9, 10, 11]]]
    assert comp.engine.position_mode == "contiguous"
    plain = load_policy("streamingllm:budget=7,rerotate=false,block_size=4").compose()
    assert plain.engine.position_mode == "original" and plain.engine.block_size == 4
    # a later block: old survivors then the block, recency across both
    lay = layout(12, 1, block=(8, 12), past=[0, 1, 2, 3, 5, 6, 7])
    assert kept(plain, lay) == [[[0, 1, 2, 3, 9, 10, 11]]]


def test_streamingllm_reuses_registered_plugins():
    comp = load_policy("streamingllm").compose()
    assert isinstance(comp.budgeter, SinkWindowBudgeter) and comp.budgeter.sinks == 4
    assert isinstance(comp.selector, RecencySelector)


# --- FINCH --------------------------------------------------------------------------------


def test_finch_scores_by_hand():
    attn = torch.zeros(1, 1, 2, 2, 4)  # question rows at slots 2 and 3, N = 4
    attn[0, 0, 0, 0, :3] = torch.tensor([0.5, 0.25, 0.25])
    attn[0, 0, 0, 1] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    attn[0, 0, 1, 0, :3] = torch.tensor([0.0, 1.0, 0.0])
    attn[0, 0, 1, 1] = torch.tensor([0.0, 0.0, 0.0, 1.0])
    out = finch_layer_scores(attn, torch.tensor([2, 3]))
    w2, w3 = 3 / 4, 4 / 4  # (position + 1) / N
    expected = torch.tensor(
        [0.5 * w2 + 0.1 * w3, (0.25 + 1.0) * w2 + 0.2 * w3, 0.25 * w2 + 0.3 * w3, 1.4 * w3]
    )
    torch.testing.assert_close(out, expected)


def test_finch_scorer_reads_question_rows_at_their_positions():
    comp = load_policy("finch").compose()
    attn = torch.rand(1, 2, 2, 5, 9)
    obs = FakeObservation(attn, n_past=4, question_rows=slice(3, 5))
    out = comp.scorers["main"].observe(obs)
    assert obs.requests == [slice(3, 5)]
    expected = finch_layer_scores(attn[..., 3:5, :], torch.tensor([7, 8]))
    torch.testing.assert_close(out, expected[None])


def test_finch_budget_grows_with_the_context_and_ends_at_target():
    bud = FinchChunkBudgeter(budget=4)
    sizes = [finch_keep_after(4, end, 10) for end in (3, 6, 9, 10)]
    assert sizes == [1, 2, 4, 4]  # round(1.2), round(2.4), round(3.6), 4
    # second chunk: 1 survivor + 3 new tokens, all candidates, keep 2, nothing protected
    alloc = bud.allocate(layout(10, 2, block=(3, 6), past=[1], index=1, n_blocks=4))
    assert alloc.k == 2 and not bool(alloc.protected.any())
    assert alloc.candidates[0, 0].tolist() == [True] * 4 + [False] * 2


def test_finch_budget_equals_the_papers_rule_when_divisible():
    # L = 1024, target 256: sigma = ceil(L / target) = 4; chunks of 128 keep 128 // 4 more each
    sigma = math.ceil(1024 / 256)
    size = 0
    for end in range(128, 1025, 128):
        size = 128 // sigma + size
        assert finch_keep_after(256, end, 1024) == size
    assert size == 256


def test_finch_is_per_layer_and_contiguous():
    comp = load_policy("finch:budget=2,block_size=3").compose()
    assert comp.engine.position_mode == "contiguous" and comp.engine.block_size == 3
    lay = layout(6, 1, block=(3, 6), past=[0, 2], layers=2, heads=2, index=1, n_blocks=2)
    scores = torch.tensor([[[0.0, 5.0, 1.0, 4.0, 2.0, 9.0]], [[3.0, 0.0, 1.0, 0.0, 2.0, 9.0]]])
    # per layer: old survivors (positions 0, 2) compete with the new chunk; heads share the set
    assert kept(comp, lay, scores) == [[[2, 4], [2, 4]], [[0, 5], [0, 5]]]
