"""Engine behaviour on tiny random models: equality with generate, budgets, positions, real shrinking."""

from __future__ import annotations

import pytest
import torch
from kvlab_plugins.sink_window import SinkWindowBudgeter
from kvlab_plugins.topk import TopKSelector
from tiny import ARCHS, tiny_model

from kvpress_lab import (
    Composition,
    EngineOptions,
    build_prompt,
    load_policy,
    prefill_and_compress,
    run,
)
from kvpress_lab.engine.runner import CompressedContext
from kvpress_lab.interfaces import Allocation, Budgeter, Scorer

CONTEXT = "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. " * 4
QUESTION = "Which animal jumps?"


def reference_generate(lm, segments, n):
    ids = segments.full_ids()[None]
    out = lm.model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=2, pad_token_id=0)
    gen = out[0, ids.shape[1] :].tolist()
    return gen[: gen.index(2)] if 2 in gen else gen


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("query_agnostic", [False, True])
def test_full_equals_generate(arch, query_agnostic):
    lm = tiny_model(arch, seed=1)
    segments = build_prompt(lm.tokenizer, CONTEXT, QUESTION, "Answer:")
    result = run(
        lm, "full", CONTEXT, QUESTION, "Answer:", max_new_tokens=12, query_agnostic=query_agnostic
    )
    assert result.answer_token_ids == reference_generate(lm, segments, 12)
    assert result.kept_tokens == segments.context_length


@pytest.mark.parametrize(
    "spec", ["random:keep_ratio=1.0", "random:keep_ratio=1,granularity=global"]
)
def test_keep_ratio_one_answers_like_full(spec):
    lm = tiny_model("qwen2", seed=2)
    full = run(lm, "full", CONTEXT, QUESTION, max_new_tokens=10)
    other = run(lm, spec, CONTEXT, QUESTION, max_new_tokens=10)
    assert other.answer_token_ids == full.answer_token_ids
    assert other.kept_tokens == full.kept_tokens


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("granularity", ["global", "layer", "head"])
def test_cache_holds_exactly_the_budget(arch, granularity):
    lm = tiny_model(arch)
    segments = build_prompt(lm.tokenizer, CONTEXT, QUESTION)
    L = segments.context_length
    policy = load_policy(f"random:keep_ratio=0.3,granularity={granularity}")
    state = prefill_and_compress(lm, policy, segments)
    expected = int(0.3 * L)
    for layer in state.cache.layers:
        assert layer.keys.shape[2] == expected  # real, smaller tensors
        assert layer.values.shape[2] == expected
    assert state.context_index.shape == (2, 2, expected)
    idx = state.context_index
    assert bool((idx[..., 1:] > idx[..., :-1]).all()), "kept indices sorted, unique"
    assert int(idx.min()) >= 0 and int(idx.max()) < L
    if granularity == "global":
        assert bool((idx == idx[:1, :1]).all())
    if granularity == "head":
        assert not bool((idx == idx[:1, :1]).all()), "per-head selections differ"


def test_kept_slots_hold_the_original_keys_and_values():
    lm = tiny_model("llama")
    segments = build_prompt(lm.tokenizer, CONTEXT, QUESTION)
    full = prefill_and_compress(lm, load_policy("full"), segments, query_agnostic=True)
    comp = prefill_and_compress(
        lm, load_policy("random:keep_ratio=0.25"), segments, query_agnostic=True
    )
    for layer in range(2):
        fk, fv = full.cache.layers[layer].keys, full.cache.layers[layer].values
        ck, cv = comp.cache.layers[layer].keys, comp.cache.layers[layer].values
        for h in range(2):
            idx = comp.context_index[layer, h]
            torch.testing.assert_close(ck[0, h], fk[0, h, idx])
            torch.testing.assert_close(cv[0, h], fv[0, h, idx])


class _PositionRecorder:
    def __init__(self, model):
        self.calls = []
        self.handle = model.model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        # the reference reads the model's own inputs; the cache keyword was renamed in 5.24
        cache = kwargs["cache"] if "cache" in kwargs else kwargs["past_key_values"]
        self.calls.append((kwargs["position_ids"][0].tolist(), cache.get_seq_length()))


def test_decoding_positions_continue_from_original_length():
    lm = tiny_model("llama")
    segments = build_prompt(lm.tokenizer, CONTEXT, QUESTION)
    L, Q = segments.context_length, segments.question_length
    rec = _PositionRecorder(lm.model)
    result = run(lm, "random:keep_ratio=0.25", CONTEXT, QUESTION, max_new_tokens=5)
    rec.handle.remove()
    k = int(result.kept_tokens)
    prefill, question, *decode = rec.calls
    assert prefill == (list(range(L)) + list(range(L, L + Q)), 0)
    assert question == (list(range(L, L + Q)), k)  # over the compressed cache, original positions
    for step, (pos, cached) in enumerate(decode):
        assert pos == [L + Q + step]
        assert cached == k + Q + step


def test_result_figures():
    lm = tiny_model("mistral")
    result = run(lm, "random:keep_ratio=0.5", CONTEXT, QUESTION, max_new_tokens=4)
    L = result.context_tokens
    per_token = 2 * 2 * 2 * 16 * 4  # layers * (k, v) * kv_heads * head_dim * float32 bytes
    assert result.kv_bytes_full == per_token * L
    assert result.kv_bytes_kept == per_token * (L // 2)
    assert result.peak_kv_tokens == L + len(result.question_token_ids)
    assert result.prefill_s > 0 and result.compress_s > 0 and result.decode_s > 0
    data = result.to_dict()
    assert data["kept_indices"] == result.kept_indices.tolist()
    assert data["policy"] == {
        "name": "random",
        "keep_ratio": 0.5,
        "budget": None,
        "decode_interval": None,
        "decode_budget": None,
        "seed": 0,
        "granularity": "head",
    }


def test_random_policy_is_seeded():
    lm = tiny_model("llama")
    a = run(lm, "random:keep_ratio=0.3,seed=1", CONTEXT, QUESTION, max_new_tokens=2)
    b = run(lm, "random:keep_ratio=0.3,seed=1", CONTEXT, QUESTION, max_new_tokens=2)
    c = run(lm, "random:keep_ratio=0.3,seed=2", CONTEXT, QUESTION, max_new_tokens=2)
    assert torch.equal(a.kept_indices, b.kept_indices)
    assert not torch.equal(a.kept_indices, c.kept_indices)


class _KeyNormScorer(Scorer):
    """Deterministic hand-checkable scorer: the slot's context index (later = better)."""

    name = "test_index"

    def score(self, layout, observed, candidates, cache_keys):
        return layout.context_index.float()


def test_blockwise_contiguous_mode_rerotates_and_continues_positions():
    lm = tiny_model("llama")
    segments = build_prompt(lm.tokenizer, CONTEXT, QUESTION)
    L = segments.context_length
    comp = Composition(
        budgeter=SinkWindowBudgeter(budget=40, sinks=4),
        scorers={"main": _KeyNormScorer()},
        selector=TopKSelector(granularity="global"),
        engine=EngineOptions(block_size=64, position_mode="contiguous"),
    )
    state: CompressedContext = prefill_and_compress(lm, comp, segments, query_agnostic=True)
    # sinks + the 36 latest tokens: the scorer prefers later tokens
    assert state.context_index[0, 0].tolist() == list(range(4)) + list(range(L - 36, L))
    assert state.next_position == 40
    assert state.peak_kv_tokens <= 40 + 64
    # keys sit at contiguous positions 0..39: equal to the full prefill's keys re-rotated there
    from kvpress_lab.ops.rope import rerotate_keys

    full = prefill_and_compress(lm, load_policy("full"), segments, query_agnostic=True)
    idx = state.context_index[0, 0]
    expected = rerotate_keys(
        full.cache.layers[0].keys[:, :, idx], idx, torch.arange(40), lm.model.model.rotary_emb
    )
    torch.testing.assert_close(state.cache.layers[0].keys, expected, atol=1e-5, rtol=1e-4)


class _BadBudgeter(Budgeter):
    name = "bad"

    def target_tokens(self, context_length):
        return 1

    def allocate(self, layout):
        ctx = ~layout.question_mask
        return Allocation(protected=ctx, candidates=torch.zeros_like(ctx), k=3)


def test_broken_budgeter_is_reported_by_name():
    from kvpress_lab.errors import PluginError

    lm = tiny_model("llama")
    segments = build_prompt(lm.tokenizer, CONTEXT, QUESTION)
    comp = Composition(
        budgeter=_BadBudgeter(), scorers={"main": _KeyNormScorer()}, selector=TopKSelector()
    )
    with pytest.raises(PluginError, match="budgeter 'bad' asked to keep 3 of only 0 candidates"):
        prefill_and_compress(lm, comp, segments)
