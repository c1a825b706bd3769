"""pyramidkv: per-layer budgets by hand (both clamps and the fallback), totals equal to the uniform
budget, the allocation it hands the engine, its SnapKV scores, error messages, and on tiny models
the ragged cache it produces and keep_ratio=1 answering like the full cache."""

from __future__ import annotations

import pytest
import torch
from kvlab_plugins.pyramidkv import PyramidBudgeter, PyramidKVPolicy, pyramid_layer_counts
from kvlab_plugins.snapkv import SnapKVScorer
from tiny import tiny_model

from kvpress_lab import run
from kvpress_lab.engine.runner import prefill_and_compress
from kvpress_lab.errors import ConfigError
from kvpress_lab.interfaces import StepLayout
from kvpress_lab.policy import budget_tokens
from kvpress_lab.prompt import PromptSegments, build_prompt
from kvpress_lab.spec import load_policy
from kvpress_lab.testing.conformance import check_policy

CONTEXT = "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. " * 4
QUESTION = "Which animal jumps?"


@pytest.mark.parametrize(
    ("args", "counts"),
    [
        # C=250, W=64, beta=2: min 125, max 375, step 62.5; 312.5 and 187.5 round half to even
        ((1000, 250, 64, 2, 5), [375, 312, 250, 188, 125]),
        # C=500, beta=8: max 937.5 >= L - W = 936, so max 936 and min 1000 - 936 = 64;
        # step 872/3: 645.33 and 354.67
        ((1000, 500, 64, 8, 4), [936, 645, 355, 64]),
        # C=250, beta=20: min 12.5 < W = 64, the pyramid does not fit: uniform (kvpress's fallback)
        ((1000, 250, 64, 20, 4), [250, 250, 250, 250]),
        # C=400, W=300, beta=8: max 750 >= 700 is clamped to 700, so min = 800 - 700 = 100 < W:
        # the fallback again
        ((1000, 400, 300, 8, 3), [400, 400, 400]),
        # one layer: the uniform budget (kvpress would keep round(max))
        ((1000, 250, 64, 2, 1), [250]),
    ],
)
def test_layer_counts_by_hand(args, counts):
    assert pyramid_layer_counts(*args) == counts


@pytest.mark.parametrize("length", [97, 300, 1000, 4096])
@pytest.mark.parametrize("keep_ratio", [0.1, 0.25, 0.3, 0.5, 0.8])
@pytest.mark.parametrize("n_layers", [2, 7, 30])
def test_total_is_the_uniform_total(length, keep_ratio, n_layers):
    target = budget_tokens(length, keep_ratio, None)
    for window in (4, 32):
        for beta in (1, 3, 20):
            counts = pyramid_layer_counts(length, target, window, beta, n_layers)
            assert sum(counts) == n_layers * target, (window, beta, counts)
            assert counts == sorted(counts, reverse=True)
            assert min(counts) >= min(window, target)


def _layout(n_layers: int, n_heads: int, n_ctx: int, n_question: int) -> StepLayout:
    index = torch.cat([torch.arange(n_ctx), torch.full((n_question,), -1)])
    return StepLayout(
        context_length=n_ctx,
        block_index=0,
        n_blocks=1,
        block_start=0,
        block_end=n_ctx,
        n_past=0,
        n_question=n_question,
        context_index=index.expand(n_layers, n_heads, -1),
    )


def test_allocation_protects_the_window_and_gives_per_layer_counts():
    # 1000 context tokens, 3 question slots, window 64: the last 61 context tokens are protected
    budgeter = PyramidBudgeter(keep_ratio=0.25, window=64, beta=2)
    alloc = budgeter.allocate(_layout(5, 2, 1000, 3))
    assert budgeter.target_tokens(1000) == 250
    assert alloc.k.tolist() == [[375 - 61], [312 - 61], [250 - 61], [188 - 61], [125 - 61]]
    protected = alloc.protected.expand(5, 2, 1003)
    assert bool((protected.sum(-1) == 61).all())
    assert bool(protected[..., 939:1000].all()) and not bool(protected[..., 1000:].any())
    assert bool((alloc.candidates.expand(5, 2, 1003).sum(-1) == 939).all())
    assert alloc.kept_counts(_layout(5, 2, 1000, 3)).tolist() == [
        [n, n] for n in (375, 312, 250, 188, 125)
    ]


def test_fallback_and_keep_all_stay_plain_allocations():
    fallback = PyramidBudgeter(keep_ratio=0.25, window=64).allocate(_layout(4, 1, 1000, 0))
    assert fallback.k == 250 - 64  # an int: the engine keeps its dense path
    everything = PyramidBudgeter(keep_ratio=1.0, window=8).allocate(_layout(4, 1, 50, 2))
    assert everything.k == 0 and bool(everything.protected[..., :50].all())


def test_policy_exposes_snapkv_and_beta_once():
    policy = load_policy("pyramidkv:keep_ratio=0.25,window=64,kernel=5,pooling=avg,beta=4")
    comp = policy.compose()
    assert comp.budgeter.window == comp.scorers["main"].window == 64
    assert comp.budgeter.beta == 4 and comp.scorers["main"].kernel == 5
    assert comp.engine.observation_window == 64
    snap = {a.name for a in SnapKVScorer.__attrs_attrs__}
    assert snap <= {a.name for a in PyramidKVPolicy.__attrs_attrs__}
    assert "Cai et al." in PyramidKVPolicy.__doc__


def test_errors_name_the_value_and_the_fix():
    with pytest.raises(ConfigError, match=r"beta=0 is invalid: it must be an integer >= 1"):
        load_policy("pyramidkv:beta=0")
    with pytest.raises(ConfigError, match=r"beta=2.5 is invalid"):
        PyramidKVPolicy(beta=2.5)
    with pytest.raises(
        ConfigError, match=r"kernel=4 is invalid: the pooling kernel must be an odd integer"
    ):
        load_policy("pyramidkv:kernel=4")
    with pytest.raises(
        ConfigError, match=r"keep_ratio=0.0 is invalid: it must be a number in \(0, 1\]"
    ):
        load_policy("pyramidkv:keep_ratio=0")


def test_conforms():
    check_policy("pyramidkv")


def test_tiny_model_keeps_a_pyramid_in_a_ragged_cache():
    lm = tiny_model("llama", seed=0, layers=4)
    ids = torch.randint(5, 60, (200,), generator=torch.Generator().manual_seed(0))
    segments = PromptSegments(context_ids=ids, question_ids=torch.empty(0, dtype=torch.long))
    policy = load_policy("pyramidkv:keep_ratio=0.5,window=16,beta=4,pooling=avg")
    state = prefill_and_compress(lm, policy, segments, query_agnostic=True)
    # C=100, min 25, max 175 < 184: 175, 125, 75, 25 tokens per layer, every head alike
    assert state.kept_counts.tolist() == [[n] * 2 for n in (175, 125, 75, 25)]
    assert int(state.kept_counts.sum()) == 4 * 2 * 100
    for layer, n in enumerate((175, 125, 75, 25)):
        kept = state.context_index[layer, :, :n]
        assert bool((kept >= 0).all()) and bool((state.context_index[layer, :, n:] == -1).all())
        assert bool((kept[:, -16:] == torch.arange(184, 200)).all()), "the window is kept"
    # inside a layer each head keeps SnapKV's top tokens (avg pooling: no ties), its count of them
    for layer, n in enumerate((175, 125, 75, 25)):
        snap = load_policy(f"snapkv:keep_ratio={n / 200},window=16,pooling=avg")
        alone = prefill_and_compress(lm, snap, segments, query_agnostic=True)
        assert torch.equal(state.context_index[layer, :, :n], alone.context_index[layer])


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_keep_ratio_one_answers_like_full(arch):
    lm = tiny_model(arch, seed=2)
    full = run(lm, "full", CONTEXT, QUESTION, max_new_tokens=10)
    pyramid = run(lm, "pyramidkv:keep_ratio=1", CONTEXT, QUESTION, max_new_tokens=10)
    assert pyramid.answer_token_ids == full.answer_token_ids
    assert pyramid.kept_tokens == full.kept_tokens
    assert build_prompt(lm.tokenizer, CONTEXT, QUESTION).context_length == full.kept_tokens
