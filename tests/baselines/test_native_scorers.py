"""Native scorer policies knorm, tova and keydiff: hand-computed scores on tiny inputs, their
budgets, and keep_ratio=1 answering exactly like the full cache on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
from kvlab_plugins.keydiff import KeyDiffScorer, keydiff_scores
from kvlab_plugins.knorm import KnormScorer
from kvlab_plugins.observation_window import ObservationWindowBudgeter
from kvlab_plugins.tova import TOVAScorer
from tiny import tiny_model

from kvpress_lab import run
from kvpress_lab.interfaces import AttentionBlock, StepLayout
from kvpress_lab.spec import load_policy

CONTEXT = "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. " * 4
QUESTION = "Which animal jumps?"


def layout(context: int, question: int, layers: int = 1, heads: int = 1) -> StepLayout:
    row = torch.tensor(list(range(context)) + [-1] * question)
    return StepLayout(
        context_length=context,
        block_index=0,
        n_blocks=1,
        block_start=0,
        block_end=context,
        n_past=0,
        n_question=question,
        context_index=row.expand(layers, heads, -1).clone(),
    )


def test_knorm_scores_are_negative_key_norms():
    # layer 0, one KV head: norms 5, 1, 2; layer 1: norms 1, 13, 0
    keys = [
        torch.tensor([[[[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]]]]),
        torch.tensor([[[[0.0, -1.0], [5.0, 12.0], [0.0, 0.0]]]]),
    ]
    lay = layout(3, 0, layers=2)
    scores = KnormScorer().score(lay, [None, None], ~lay.question_mask, lambda i: keys[i])
    expected = torch.tensor([[[-5.0, -1.0, -2.0]], [[-1.0, -13.0, 0.0]]])
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected)


def test_knorm_keeps_the_smallest_norms_per_head():
    from kvlab_plugins.topk import TopKSelector

    from kvpress_lab.selection import reduce_scores, topk_candidates

    # two KV heads: head 0 norms 5, 1, 2, 4; head 1 norms 1, 3, 2, 0
    keys = torch.tensor(
        [
            [
                [[3.0, 4.0], [1.0, 0.0], [0.0, 2.0], [0.0, 4.0]],
                [[1.0, 0.0], [0.0, 3.0], [2.0, 0.0], [0.0, 0.0]],
            ]
        ]
    )
    lay = layout(4, 0, heads=2)
    scores = KnormScorer().score(lay, [None], ~lay.question_mask, lambda i: keys)
    assert TopKSelector().granularity == "head"
    kept = topk_candidates(reduce_scores(scores, "head"), ~lay.question_mask, 2)
    assert kept.tolist() == [[[1, 2], [0, 3]]]


class LastRowObservation:
    """Duck-typed LayerObservation holding the hand-built attention of the pass's last row."""

    def __init__(self, attn: torch.Tensor, n_rows: int) -> None:
        self.attn, self.n_rows = attn, n_rows
        self.requests: list[slice] = []

    @property
    def keys(self) -> torch.Tensor:
        """Stand-in keys: only their shape [B, H, N, 1] is read."""
        b, h, _, _, n = self.attn.shape
        return self.attn.new_zeros(b, h, n, 1)

    def attention(self, rows: slice) -> torch.Tensor:
        self.requests.append(rows)
        assert (rows.start, rows.stop) == (self.n_rows - 1, self.n_rows)
        return self.attn

    def attention_blocks(self, rows: slice, causal: bool = True, slots=None, max_rows=None):
        """One block per KV head (as a small attention chunk gives), to test the reduction."""
        attn = self.attention(rows)
        for h in range(attn.shape[1]):
            yield AttentionBlock(
                rows=rows,
                heads=slice(h, h + 1),
                keys=slice(0, attn.shape[-1]),
                weights=attn[:, h : h + 1],
                complete=False,
            )


def test_tova_scores_average_the_last_row_over_every_query_head():
    # 2 KV heads x 2 query heads each, one (last) row over 4 slots
    attn = torch.tensor(
        [
            [0.10, 0.20, 0.30, 0.40],
            [0.70, 0.10, 0.10, 0.10],
            [0.00, 0.50, 0.25, 0.25],
            [0.20, 0.20, 0.20, 0.40],
        ]
    ).reshape(1, 2, 2, 1, 4)
    obs = LastRowObservation(attn, n_rows=6)
    observed = TOVAScorer().observe(obs)
    # by hand: column means over the four heads
    expected = torch.tensor([[0.25, 0.25, 0.2125, 0.2875]])
    torch.testing.assert_close(observed, expected)
    assert obs.requests == [slice(5, 6)]
    lay = layout(4, 0)
    scores = TOVAScorer().score(lay, [observed, 2 * observed], ~lay.question_mask, None)
    assert scores.shape == (2, 1, 4)  # one score row per layer: every KV head keeps the same set
    torch.testing.assert_close(scores[1], 2 * expected)


def test_tova_protects_the_observing_token_only_when_it_is_context():
    budgeter = ObservationWindowBudgeter(keep_ratio=0.5, window=1)
    agnostic = budgeter.allocate(layout(8, 0))
    assert agnostic.protected[0, 0].tolist() == [False] * 7 + [True]
    assert agnostic.k == 3
    aware = budgeter.allocate(layout(8, 3))
    assert not bool(aware.protected.any())
    assert aware.candidates[0, 0].tolist() == [True] * 8 + [False] * 3
    assert aware.k == 4


def test_keydiff_scores_by_hand():
    # one head: context keys (1,0), (2,0), (0,3); normalised (1,0), (1,0), (0,1)
    # anchor = (2/3, 1/3); cos with (1,0) = 2/sqrt(5), with (0,1) = 1/sqrt(5)
    # slot 3 is a question key (0,1): scored, but left out of the anchor
    keys = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [0.0, 1.0]]])
    context = torch.tensor([[True, True, True, False]])
    a, b = 2 / math.sqrt(5), 1 / math.sqrt(5)
    torch.testing.assert_close(keydiff_scores(keys, context), torch.tensor([[-a, -a, -b, -b]]))

    # through the scorer: the question slot comes from the layout; two heads, two layers
    lay = layout(3, 1, layers=2, heads=2)
    per_layer = [
        keys[None].expand(1, 2, 4, 2),
        torch.flip(keys, dims=[-1])[None].repeat(1, 2, 1, 1),
    ]
    scores = KeyDiffScorer().score(lay, [None, None], ~lay.question_mask, lambda i: per_layer[i])
    assert scores.shape == (2, 2, 4)
    torch.testing.assert_close(scores[0, 1], torch.tensor([-a, -a, -b, -b]))
    torch.testing.assert_close(scores[1, 0], torch.tensor([-a, -a, -b, -b]))  # axes swapped


def test_keydiff_anchor_would_move_with_the_question():
    keys = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [0.0, 1.0]]])
    with_question = keydiff_scores(keys, torch.ones(1, 4, dtype=torch.bool))
    # anchor (1/2, 1/2): every cosine is 1/sqrt(2)
    torch.testing.assert_close(with_question, torch.full((1, 4), -1 / math.sqrt(2)))


@pytest.mark.parametrize("name", ["knorm", "tova", "keydiff"])
def test_policy_spec_and_record(name):
    policy = load_policy(f"{name}:keep_ratio=0.25")
    assert repr(policy).endswith(
        "(keep_ratio=0.25, budget=None, decode_interval=None, decode_budget=None)"
    )
    assert policy.params() == {
        "keep_ratio": 0.25,
        "budget": None,
        "decode_interval": None,
        "decode_budget": None,
    }


@pytest.mark.parametrize("name", ["knorm", "tova", "keydiff"])
@pytest.mark.parametrize("query_agnostic", [False, True])
def test_keep_ratio_one_answers_like_full(name, query_agnostic):
    lm = tiny_model("qwen2", seed=2)
    full = run(lm, "full", CONTEXT, QUESTION, max_new_tokens=10, query_agnostic=query_agnostic)
    other = run(
        lm,
        f"{name}:keep_ratio=1",
        CONTEXT,
        QUESTION,
        max_new_tokens=10,
        query_agnostic=query_agnostic,
    )
    assert other.answer_token_ids == full.answer_token_ids
    assert other.kept_tokens == full.kept_tokens


@pytest.mark.parametrize("name", ["knorm", "tova", "keydiff"])
def test_compressed_run_keeps_the_budget(name):
    lm = tiny_model("llama")
    result = run(lm, f"{name}:keep_ratio=0.3", CONTEXT, QUESTION, max_new_tokens=4)
    full = run(lm, "full", CONTEXT, QUESTION, max_new_tokens=4)
    assert result.kept_tokens == int(0.3 * full.kept_tokens)
