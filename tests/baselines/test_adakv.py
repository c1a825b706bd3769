"""adakv: the pooled selection with its safeguard by hand (exact kept slots), per-layer totals,
protected slots counting towards the safeguard, reuse of any policy's scores, error messages,
and on tiny models the ragged cache it produces and keep_ratio=1 answering like the full cache."""

from __future__ import annotations

import pytest
import torch
from kvlab_plugins.adakv import PROTECTED, AdaKVPolicy, AdaKVSelector, adakv_select
from tiny import tiny_model

from kvpress_lab import run
from kvpress_lab.engine.runner import prefill_and_compress
from kvpress_lab.errors import ConfigError, UnknownPolicyError
from kvpress_lab.interfaces import ScoreSource
from kvpress_lab.prompt import PromptSegments, build_prompt
from kvpress_lab.spec import load_policy
from kvpress_lab.testing.conformance import check_policy

CONTEXT = "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. " * 4
QUESTION = "Which animal jumps?"

# one layer, two KV heads, 6 slots: head 0 scores high everywhere, head 1 low everywhere
SCORES = torch.tensor([[[9.0, 8, 7, 6, 5, 4], [0.1, 0.2, 0.3, 0.6, 0.5, 0.4]]])
ALL = torch.ones(1, 2, 6, dtype=torch.bool)


def _kept(mask: torch.Tensor) -> list[list[list[int]]]:
    return [[row.nonzero().flatten().tolist() for row in layer] for layer in mask]


@pytest.mark.parametrize(
    ("alpha", "kept"),
    [
        # no safeguard: the layer's 6 slots all go to head 0
        (0.0, [[0, 1, 2, 3, 4, 5], []]),
        # 0.2 * 3 = 0.6 floors to 0, raised to 1: head 1 keeps its best slot (3), head 0 five
        (0.2, [[0, 1, 2, 3, 4], [3]]),
        # 0.7 * 3 = 2.1: two guarded slots per head, the remaining 2 pooled go to head 0
        (0.7, [[0, 1, 2, 3], [3, 4]]),
        # everything guarded: the uniform per-head top-3
        (1.0, [[0, 1, 2], [3, 4, 5]]),
    ],
)
def test_safeguard_then_pool_by_hand(alpha, kept):
    mask = adakv_select(SCORES, ALL, 3, alpha)
    assert _kept(mask) == [kept]
    assert int(mask.sum()) == 6, "the layer keeps the sum of its heads' counts"


def test_protected_slots_count_first_towards_the_safeguard():
    # k=2 per head. Head 1's slot 0 is protected (not a candidate): it keeps 1 + 2 = 3, and
    # floor(0.5 * 3) = 1 is met by the protected slot, so no candidate of head 1 is guarded;
    # head 0 is guarded floor(0.5 * 2) = 1 (slot 0) and the pooled 3 go to head 0 as well
    protected = torch.zeros(1, 2, 6, dtype=torch.bool)
    protected[0, 1, 0] = True
    cand = ALL & ~protected
    mask = adakv_select(SCORES, cand, 2, 0.5, protected)
    assert _kept(mask) == [[[0, 1, 2, 3], []]]
    # without counting it, head 1 would be guarded its best candidate (slot 3)
    assert _kept(adakv_select(SCORES, cand, 2, 0.5)) == [[[0, 1, 2], [3]]]


def test_layers_pool_separately_with_per_layer_counts():
    # layer 0: head 1 high; layer 1: head 0 high. Per-layer k (as a pyramid budgeter gives)
    scores = torch.stack([SCORES[0].flip(0), SCORES[0]])  # [2, 2, 6]
    k = torch.tensor([[2], [1]])
    mask = adakv_select(scores, ALL, k, 0.0)
    assert _kept(mask) == [[[], [0, 1, 2, 3]], [[0, 1], []]]
    assert mask.sum(-1).sum(-1).tolist() == [4, 2]


def test_non_candidates_are_never_pooled():
    cand = ALL.clone()
    cand[0, 0, :3] = False  # head 0's best three are not candidates
    mask = adakv_select(SCORES, cand, 3, 0.0)
    assert _kept(mask) == [[[3, 4, 5], [3, 4, 5]]]
    assert not bool((mask & ~cand).any())


class _Source(ScoreSource):
    def __init__(self, **scores: torch.Tensor) -> None:
        self._scores = scores

    def scores(self, name, candidates):
        return self._scores[name]


def test_selector_reads_its_scorer_and_the_protected_slots():
    protected = torch.zeros(1, 2, 6)
    protected[0, 1, 0] = 1.0
    selector = AdaKVSelector(scorer="main", protected=PROTECTED, alpha_safeguard=0.5)
    assert selector.scorer_names() == ("main", PROTECTED) and selector.pools_heads
    source = _Source(main=SCORES, **{PROTECTED: protected})
    mask = selector.select(source, ALL & (protected == 0), 2)
    assert _kept(mask) == [[[0, 1, 2, 3], []]]


def test_policy_reuses_the_named_scoring():
    policy = load_policy("adakv:keep_ratio=0.25,scorer=snapkv+window=64+kernel=5+pooling=avg")
    comp = policy.compose()
    assert isinstance(comp.selector, AdaKVSelector) and comp.selector.alpha_safeguard == 0.2
    assert comp.budgeter.window == 64 and comp.scorers["main"].pooling == "avg"
    assert set(comp.scorers) == {"main", PROTECTED}
    assert comp.engine.observation_window == 64
    knorm = load_policy("adakv:keep_ratio=0.5,alpha_safeguard=0.5,scorer=knorm").compose()
    assert knorm.selector.alpha_safeguard == 0.5 and knorm.budgeter.keep_ratio == 0.5
    assert "Feng et al." in AdaKVPolicy.__doc__


def test_errors_name_the_value_and_the_fix():
    with pytest.raises(ConfigError, match=r"alpha_safeguard=1.5 is invalid: it must be a number"):
        load_policy("adakv:alpha_safeguard=1.5")
    with pytest.raises(ConfigError, match=r"sets keep_ratio; the budget belongs to adakv"):
        load_policy("adakv:scorer=snapkv+keep_ratio=0.1")
    with pytest.raises(ConfigError, match=r"'full' does not take the budget"):
        AdaKVPolicy(scorer="full", keep_ratio=0.25)
    with pytest.raises(UnknownPolicyError, match=r"unknown policy 'snapk'"):
        load_policy("adakv:scorer=snapk")


def test_conforms():
    check_policy("adakv")


@pytest.mark.parametrize(
    ("inner", "plain"),
    [("snapkv+window=16+pooling=avg", "snapkv:window=16,pooling=avg"), ("knorm", "knorm")],
)
def test_tiny_model_heads_keep_different_counts_at_the_uniform_total(inner, plain):
    lm = tiny_model("llama", seed=0, layers=4)
    ids = torch.randint(5, 60, (200,), generator=torch.Generator().manual_seed(0))
    segments = PromptSegments(context_ids=ids, question_ids=torch.empty(0, dtype=torch.long))

    def compress(spec: str):
        return prefill_and_compress(lm, load_policy(spec), segments, query_agnostic=True)

    counts = compress(f"adakv:keep_ratio=0.25,scorer={inner}").kept_counts
    assert counts.sum(-1).tolist() == [2 * 50] * 4, "each layer keeps its uniform total"
    assert bool((counts != counts[:, :1]).any()), "heads keep different counts"
    assert int(counts.min()) >= 10, "every head keeps at least its safeguard (0.2 * 50)"
    # alpha_safeguard=1 guards each head's whole count: the uniform policy, in a dense cache
    uniform = compress(f"adakv:keep_ratio=0.25,alpha_safeguard=1,scorer={inner}")
    assert uniform.kept_counts is None
    sep = "," if ":" in plain else ":"
    assert torch.equal(
        uniform.context_index, compress(f"{plain}{sep}keep_ratio=0.25").context_index
    )


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_keep_ratio_one_answers_like_full(arch):
    lm = tiny_model(arch, seed=2)
    full = run(lm, "full", CONTEXT, QUESTION, max_new_tokens=10)
    ada = run(lm, "adakv:keep_ratio=1,scorer=knorm", CONTEXT, QUESTION, max_new_tokens=10)
    assert ada.answer_token_ids == full.answer_token_ids
    assert ada.kept_tokens == full.kept_tokens
    assert build_prompt(lm.tokenizer, CONTEXT, QUESTION).context_length == full.kept_tokens
