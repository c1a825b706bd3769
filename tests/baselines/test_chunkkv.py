"""chunkkv: chunk selection by hand on tiny inputs, its budget, its reuse of any policy's scoring,
keep_ratio=1 answering like the full cache, error messages, and the conformance suite."""

from __future__ import annotations

import pytest
import torch
from kvlab_plugins.chunkkv import ChunkKVPolicy, ChunkSelector, chunk_select
from tiny import tiny_model

from kvpress_lab import run
from kvpress_lab.engine.runner import prefill_and_compress
from kvpress_lab.errors import ConfigError, PluginError, UnknownPolicyError
from kvpress_lab.interfaces import ScoreSource
from kvpress_lab.prompt import build_prompt
from kvpress_lab.spec import load_policy
from kvpress_lab.testing.conformance import check_policy

CONTEXT = "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. " * 4
QUESTION = "Which animal jumps?"

# 10 context slots and one question slot; chunk_length 3 gives chunks {0,1,2} {3,4,5} {6,7,8}
# and the short last chunk {9}. Chunk means: 1/3, 5, 3, 2 -> ranked c1, c2, c3, c0.
SCORES = torch.tensor([[[1.0, 0, 0, 5, 5, 5, 0, 9, 0, 2, 7]]])
POSITIONS = torch.tensor([[list(range(10)) + [-1]]])


@pytest.mark.parametrize(
    ("k", "kept"),
    [
        (3, [3, 4, 5]),  # the best chunk, whole
        (4, [3, 4, 5, 7]),  # + the best token (9.0) of the next chunk, cut to fit
        (5, [3, 4, 5, 6, 7]),  # tie 0.0 between slots 6 and 8: the earlier one
        (7, [3, 4, 5, 6, 7, 8, 9]),  # the short last chunk ranks third
        (8, [0, 3, 4, 5, 6, 7, 8, 9]),
    ],
)
def test_chunks_by_hand(k, kept):
    out = chunk_select(SCORES, POSITIONS, POSITIONS >= 0, k, chunk_length=3)
    assert out.tolist() == [[kept]]


def test_protected_slots_do_not_count_in_a_chunk_score():
    # slots 7 and 8 protected (not candidates): chunk {6,7,8} scores by slot 6 alone (0.0), so the
    # short chunk {9} (2.0) and then chunk {0,1,2} (1/3) come first
    cand = (POSITIONS >= 0) & ~torch.isin(POSITIONS, torch.tensor([7, 8]))
    out = chunk_select(SCORES, POSITIONS, cand, 5, chunk_length=3)
    assert out.tolist() == [[[0, 3, 4, 5, 9]]]


def test_layer_granularity_sums_heads_and_keeps_one_set_per_layer():
    # head 0 prefers chunk {0,1}, head 1 chunk {2,3}; summed over heads chunk {2,3} wins (4 > 3)
    scores = torch.tensor([[[3.0, 3.0, 0.0, 0.0], [0.0, 0.0, 4.0, 4.0]]])
    pos = torch.arange(4).expand(1, 2, 4)

    class Source(ScoreSource):
        def scores(self, name, candidates):
            return {"main": scores, "context_position": pos}[name]

    cand = torch.ones(1, 2, 4, dtype=torch.bool)
    layer = ChunkSelector(chunk_length=2).select(Source(), cand, 2)
    head = ChunkSelector(chunk_length=2, granularity="head").select(Source(), cand, 2)
    assert layer.tolist() == [[[2, 3]]]
    assert head.tolist() == [[[0, 1], [2, 3]]]


def test_one_set_for_heads_whose_positions_differ_is_refused():
    pos = torch.tensor([[[0, 1, 2], [0, 2, 1]]])
    with pytest.raises(PluginError, match="positions differ between heads"):
        chunk_select(torch.zeros(1, 1, 3), pos, torch.ones(1, 1, 3, dtype=torch.bool), 1, 2)


def brute_force_chunks(scores, positions, candidates, k, chunk_length):
    """ChunkKV's rule on plain lists: chunks ranked by their candidates' exact mean (ties: the
    earlier chunk), whole while they fit, then the cut chunk's best candidates (ties: the
    earlier slot); fewer candidates than k: the earliest other slots."""
    from fractions import Fraction

    members: dict[int, list[int]] = {}
    for slot, (pos, cand) in enumerate(zip(positions, candidates, strict=True)):
        if cand:
            members.setdefault(pos // chunk_length, []).append(slot)
    ranked = sorted(
        members.values(),
        key=lambda slots: (-Fraction(sum(int(scores[s]) for s in slots), len(slots)), slots[0]),
    )
    kept: list[int] = []
    for slots in ranked:
        best = sorted(slots, key=lambda s: (-scores[s], s))
        kept += best[: k - len(kept)]
        if len(kept) == k:
            break
    others = [s for s in range(len(scores)) if s not in kept]
    return sorted(kept + others[: k - len(kept)])


@pytest.mark.parametrize("seed", range(4))
def test_chunk_selection_equals_a_brute_force_reference(seed):
    # integer scores: many ties between tokens and between chunk means; protected slots inside
    # chunks, question slots at the end, several index sets at once, k up to every slot
    gen = torch.Generator().manual_seed(seed)
    for _ in range(60):
        n = int(torch.randint(1, 40, (1,), generator=gen))
        q = int(torch.randint(0, 4, (1,), generator=gen))
        rows, heads = int(torch.randint(1, 3, (1,), generator=gen)), 2
        positions = torch.cat([torch.arange(n), torch.full((q,), -1)])
        scores = torch.randint(-3, 4, (rows, heads, n + q), generator=gen).float()
        cand = (torch.rand(rows, heads, n + q, generator=gen) > 0.2) & (positions >= 0)
        length = int(torch.randint(1, 7, (1,), generator=gen))
        k = int(torch.randint(0, n + q + 1, (1,), generator=gen))
        got = chunk_select(scores, positions.expand(1, 1, -1), cand, k, length)
        for r in range(rows):
            for h in range(heads):
                expected = brute_force_chunks(
                    scores[r, h].tolist(), positions.tolist(), cand[r, h].tolist(), k, length
                )
                assert got[r, h].tolist() == expected, (n, q, k, length, scores[r, h].tolist())


def _kept(lm, spec: str, query_agnostic: bool = False) -> torch.Tensor:
    segments = build_prompt(lm.tokenizer, CONTEXT, QUESTION)
    state = prefill_and_compress(lm, load_policy(spec), segments, query_agnostic=query_agnostic)
    return state.context_index


@pytest.mark.parametrize("inner", ["snapkv", "knorm", "tova", "expected_attention"])
def test_any_scorer_keeps_the_fair_budget_in_chunks(inner):
    lm = tiny_model("llama", seed=1)
    length = build_prompt(lm.tokenizer, CONTEXT, QUESTION).context_length
    kept = _kept(lm, f"chunkkv:keep_ratio=0.3,chunk_length=8,scorer={inner}")
    assert kept.shape[-1] == int(0.3 * length)
    assert bool((kept == kept[:, :1]).all()), "granularity=layer: one set per layer"
    # whole chunks, except at most one cut chunk and what the inner budgeter protects
    protected = {
        "snapkv": set(range(length - 32, length)),  # its observation window (default 32)
        "expected_attention": set(range(4)),  # its 4 sinks
    }.get(inner, set())
    for layer in kept[:, 0].tolist():
        chunks: dict[int, int] = {}
        for p in set(layer) - protected:
            chunks[p // 8] = chunks.get(p // 8, 0) + 1
        sizes = [
            min(8, length - 8 * c) - len({*range(8 * c, 8 * c + 8)} & protected) for c in chunks
        ]
        partial = [c for c, size in zip(chunks, sizes, strict=True) if chunks[c] != size]
        assert len(partial) <= 1, f"more than one cut chunk: {sorted(chunks.items())}"


@pytest.mark.parametrize(
    ("inner", "granularity"), [("tova", "layer"), ("expected_attention", "head")]
)
def test_chunks_of_one_token_are_the_inner_policys_top_k(inner, granularity):
    # with chunk_length=1 every chunk is a token: chunkkv must keep exactly what the inner
    # policy keeps at the inner policy's own granularity
    lm = tiny_model("qwen2", seed=3)
    ours = _kept(
        lm, f"chunkkv:keep_ratio=0.3,chunk_length=1,granularity={granularity},scorer={inner}"
    )
    theirs = _kept(lm, f"{inner}:keep_ratio=0.3")
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("query_agnostic", [False, True])
def test_keep_ratio_one_answers_like_full(query_agnostic):
    lm = tiny_model("qwen2", seed=2)
    kwargs = dict(max_new_tokens=10, query_agnostic=query_agnostic)
    full = run(lm, "full", CONTEXT, QUESTION, **kwargs)
    chunk = run(lm, "chunkkv:keep_ratio=1,scorer=knorm", CONTEXT, QUESTION, **kwargs)
    assert chunk.answer_token_ids == full.answer_token_ids
    assert chunk.kept_tokens == full.kept_tokens


def test_spec_record_and_reused_parameters():
    policy = load_policy("chunkkv:keep_ratio=0.25,scorer=snapkv+window=16+kernel=5+pooling=avg")
    assert policy.scorer == "snapkv+window=16+kernel=5+pooling=avg"
    comp = policy.compose()
    assert comp.budgeter.keep_ratio == 0.25 and comp.budgeter.window == 16
    assert comp.scorers["main"].pooling == "avg" and comp.engine.observation_window == 16
    assert isinstance(comp.selector, ChunkSelector) and comp.selector.chunk_length == 20
    budget = load_policy("chunkkv:budget=40,scorer=knorm").compose().budgeter
    assert (budget.keep_ratio, budget.budget) == (0.5, 40)


def test_errors_name_the_value_and_the_fix():
    with pytest.raises(ConfigError, match=r"sets keep_ratio; the budget belongs to chunkkv"):
        load_policy("chunkkv:scorer=snapkv+keep_ratio=0.1")
    with pytest.raises(ConfigError, match=r"'full' does not take the budget"):
        ChunkKVPolicy(scorer="full", keep_ratio=0.25)
    with pytest.raises(UnknownPolicyError, match=r"unknown policy 'snapk'.*Did you mean 'snapkv'"):
        load_policy("chunkkv:scorer=snapk")
    with pytest.raises(ConfigError, match=r"snapkv has no parameter 'windw'"):
        load_policy("chunkkv:scorer=snapkv+windw=8")
    with pytest.raises(ConfigError, match=r"chunk_length=0 is invalid"):
        load_policy("chunkkv:chunk_length=0")


def test_conforms():
    check_policy("chunkkv")
