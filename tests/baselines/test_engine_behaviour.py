"""Baselines run through the engine on tiny random models: fairness, memory bounds, key
re-rotation against RoPE from scratch, H2O's decode-time eviction."""

from __future__ import annotations

import sys

import attrs
import pytest
import torch
from kvlab_plugins.finch import finch_keep_after
from tiny import tiny_model

from kvpress_lab.adapters import adapter_for
from kvpress_lab.engine.decode import greedy_decode
from kvpress_lab.engine.runner import prefill_and_compress
from kvpress_lab.interfaces import Allocation, Budgeter, StepLayout
from kvpress_lab.policy import budget_tokens
from kvpress_lab.prompt import PromptSegments
from kvpress_lab.registry import default_registry
from kvpress_lab.spec import load_policy

L = 300
Q = 12
BLOCK = 64


def attention_layers(model):
    """The attention modules, found independently of the adapter under test."""
    return [layer.self_attn for layer in model.model.layers]


def rotary_function(attn):
    """The model family's own RoPE function (the reference the adapter must agree with)."""
    return sys.modules[type(attn).__module__].apply_rotary_pos_emb


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", seed=3, layers=2, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def segments() -> PromptSegments:
    gen = torch.Generator().manual_seed(7)
    return PromptSegments(
        context_ids=torch.randint(3, 250, (L,), generator=gen),
        question_ids=torch.randint(3, 250, (Q,), generator=gen),
    )


def _with_block_size(name: str, **kwargs):
    cls = default_registry().policy_class(name)
    if "block_size" in attrs.fields_dict(cls):
        kwargs["block_size"] = BLOCK
    return load_policy(name, **kwargs)


def _compressing_policies() -> list[str]:
    return [n for n in default_registry().names("policy") if n != "full"]


def test_the_baselines_are_registered():
    assert {"snapkv", "h2o", "streamingllm", "finch"} <= set(_compressing_policies())


@pytest.mark.parametrize("name", _compressing_policies())
def test_every_registered_policy_keeps_the_same_tokens_per_layer(name, lm, segments):
    """Fairness: at one keep_ratio every policy ends with floor(r * L) context tokens per layer
    (within 1%); block-wise policies run several blocks."""
    ratio = 0.3
    target = budget_tokens(L, ratio, None)
    policy = _with_block_size(name, keep_ratio=ratio)
    state = prefill_and_compress(lm, policy, segments)
    index = state.context_index
    assert index.shape[0] == 2
    # per-layer / per-head allocations: the mean over layers and heads (the total) is fair
    assert abs(state.kept_tokens - target) <= 0.01 * target, (
        f"{name} kept {state.kept_tokens} context tokens per layer; the fair count is {target}"
    )
    # rows of a ragged result hold their count of positions, then -1 padding
    counts = state.kept_counts
    held = torch.ones_like(index, dtype=torch.bool)
    if counts is not None:
        held = torch.arange(index.shape[-1]) < counts[..., None]
    assert bool(((index[held] >= 0) & (index[held] < L)).all())
    assert bool((index[~held] == -1).all())
    rising = (index.diff(dim=-1) > 0) | ~held[..., 1:]
    assert bool(rising.all()), "kept positions are not unique and ordered"
    if getattr(policy, "block_size", None):
        assert state.blocks == -(-L // BLOCK) > 1


class RecordingBudgeter(Budgeter):
    """Delegates to a policy's budgeter and records every step's layout."""

    name = "recording"

    def __init__(self, inner: Budgeter) -> None:
        self.inner, self.layouts = inner, []

    def target_tokens(self, context_length: int) -> int:
        return self.inner.target_tokens(context_length)

    def allocate(self, layout: StepLayout) -> Allocation:
        self.layouts.append(layout)
        return self.inner.allocate(layout)


def test_finch_cache_never_exceeds_its_target(lm, segments):
    comp = load_policy("finch:keep_ratio=0.25,block_size=40").compose()
    recorder = RecordingBudgeter(comp.budgeter)
    state = prefill_and_compress(lm, attrs.evolve(comp, budgeter=recorder), segments)
    target = budget_tokens(L, 0.25, None)
    carried = [lay.n_past for lay in recorder.layouts]
    ends = [lay.block_end for lay in recorder.layouts]
    assert len(carried) == 8
    assert max(carried) <= target
    # the cache carried into each chunk is what the previous chunk kept
    assert carried == [0] + [finch_keep_after(target, e, L) for e in ends[:-1]]
    assert state.kept_tokens == target
    # every chunk's question is dropped, and survivors compete with the new chunk
    assert all(lay.n_question == Q for lay in recorder.layouts)
    assert state.peak_kv_tokens <= target + 40 + Q


def test_streamingllm_blockwise_memory_is_bounded(lm, segments):
    target = budget_tokens(L, 0.2, None)
    state = prefill_and_compress(
        lm, load_policy("streamingllm:keep_ratio=0.2,block_size=32"), segments
    )
    assert state.blocks == 10
    assert state.peak_kv_tokens <= target + 32 + Q < L
    expected = torch.cat([torch.arange(4), torch.arange(L - (target - 4), L)])
    assert bool((state.context_index == expected).all())
    assert state.next_position == target  # contiguous positions: the question continues at C
    one_shot = prefill_and_compress(lm, load_policy("streamingllm:keep_ratio=0.2"), segments)
    assert one_shot.peak_kv_tokens == L + Q
    assert bool((one_shot.context_index == expected).all())


def _capture_inputs(model):
    """Forward hooks recording each attention layer's input hidden states, per forward pass."""
    captured: list[list[torch.Tensor]] = [[] for _ in attention_layers(model)]

    def make(i):
        def hook(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            captured[i].append(hidden[0].detach().clone())

        return hook

    handles = [
        attn.register_forward_pre_hook(make(i), with_kwargs=True)
        for i, attn in enumerate(attention_layers(model))
    ]
    return captured, handles


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_finch_rerotated_keys_equal_keys_from_scratch(arch, segments):
    lm = tiny_model(arch, seed=5, layers=2, heads=4, kv_heads=2)
    model = lm.model
    block = 48
    captured, handles = _capture_inputs(model)
    try:
        state = prefill_and_compress(
            lm, load_policy(f"finch:keep_ratio=0.3,block_size={block}"), segments
        )
    finally:
        for h in handles:
            h.remove()
    assert state.blocks == 7
    k = state.kept_tokens
    rotary = model.model.rotary_emb
    for layer, attn in enumerate(attention_layers(model)):
        positions = state.context_index[layer]
        assert bool((positions == positions[:1]).all())  # one index set per layer
        rows = torch.stack(
            [captured[layer][int(p) // block][int(p) % block] for p in positions[0]]
        )  # [k, hidden] layer inputs of the kept tokens, from the pass that processed them
        with torch.no_grad():
            pre = attn.k_proj(rows).view(1, k, -1, attn.head_dim)
            if getattr(attn, "k_norm", None) is not None:
                pre = attn.k_norm(pre)
            pre = pre.transpose(1, 2)  # [1, H, k, D]
            cos, sin = rotary(pre, torch.arange(k)[None])
            scratch, _ = rotary_function(attn)(pre, pre, cos, sin)
            at_original, _ = rotary_function(attn)(pre, pre, *rotary(pre, positions[:1]))
        cached = state.cache.layers[layer].keys
        torch.testing.assert_close(cached, scratch, atol=1e-5, rtol=0)
        # the check can fail: keys left at their original positions differ clearly
        assert float((cached - at_original).abs().max()) > 1e-3


def test_h2o_decode_eviction_keeps_the_cache_at_budget(lm, segments):
    comp = load_policy("h2o:keep_ratio=0.2,decode_eviction=true").compose()
    state = prefill_and_compress(lm, comp, segments)
    budget = state.kept_tokens
    assert budget == 60
    evictor = comp.decode_evictor.start(lm, state)
    sizes: list[list[int]] = []
    after = evictor.after_forward

    def recording_after_forward(view, observed):
        after(view, observed)
        sizes.append([int(layer.keys.shape[2]) for layer in state.cache.layers])

    evictor.after_forward = recording_after_forward
    generated = greedy_decode(
        adapter_for(lm.model),
        state.cache,
        segments.question_ids,
        state.next_position,
        33,
        stop_ids=set(),
        eviction=evictor,
    )
    assert len(generated) == 33  # question pass + 32 generated tokens fed back
    assert len(sizes) == 33
    assert all(s == [budget, budget] for s in sizes)
    # scores follow the cache slots, the most recent half is always kept
    assert all(s.shape == (2, budget) for s in evictor.scores)
    assert not any(attn._forward_hooks for attn in attention_layers(lm.model))


def test_h2o_without_decode_eviction_grows_while_decoding(lm, segments):
    from kvpress_lab.engine.api import run_segments

    faithful = run_segments(
        lm, load_policy("h2o:keep_ratio=0.2,decode_eviction=true"), segments, max_new_tokens=8
    )
    assert not any(attn._forward_hooks for attn in attention_layers(lm.model))  # closed by run
    default = run_segments(lm, load_policy("h2o:keep_ratio=0.2"), segments, max_new_tokens=8)
    assert faithful.kept_tokens == default.kept_tokens == 60


def test_h2o_scores_equal_summed_eager_attention(segments):
    """Independent reference: the attention weights transformers' eager attention returns,
    summed over every query row and over the query heads of each KV head."""
    lm = tiny_model("llama", seed=3, attn="eager", layers=2, heads=4, kv_heads=2)
    comp = load_policy("h2o:keep_ratio=0.3,query_block=50").compose()
    prefill_and_compress(lm, comp, segments)
    _, scores = comp.scorers["main"].last  # [Ly, H, L + Q]
    with torch.no_grad():
        out = lm.model(input_ids=segments.full_ids()[None], output_attentions=True)
    for layer, weights in enumerate(out.attentions):  # [1, H_q, n, n]
        reference = weights[0].sum(dim=1).view(2, 2, -1).sum(dim=1)  # query head -> KV head
        torch.testing.assert_close(scores[layer], reference, atol=1e-5, rtol=1e-4)
