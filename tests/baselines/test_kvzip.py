"""KVzip: hand-computed scores, probes, an eager brute-force reference, the engine's probe pass."""

from __future__ import annotations

import math

import attrs
import pytest
import torch
from kvlab_plugins.kvzip import (
    FIRST_PROMPT,
    NEXT_PROMPT,
    KVzipScorer,
    reconstruction_probes,
    reconstruction_scores,
    template_parts,
)
from tiny import TinyTokenizer, tiny_model

from kvpress_lab import run
from kvpress_lab.adapters import adapter_for
from kvpress_lab.engine.api import run_segments
from kvpress_lab.engine.runner import ProbeInputs, prefill_and_compress, run_probes
from kvpress_lab.engine.shared import run_shared
from kvpress_lab.errors import ConfigError
from kvpress_lab.interfaces import LayerObservation, Probe, StepLayout
from kvpress_lab.policy import EngineOptions
from kvpress_lab.prompt import build_prompt
from kvpress_lab.spec import load_policy
from kvpress_lab.testing.conformance import check_policy

CONTEXT = "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. " * 3
QUESTION = "Which animal jumps?"


def _chars(text: str) -> list[int]:
    return TinyTokenizer()(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- scores by hand


class _DotAdapter:
    """Queries are the layer input itself (one value per query head), logits are q * k."""

    def queries(self, layer, hidden, positions):
        return hidden.transpose(1, 2)[..., None]  # [B, Hq, r, 1]

    def attention_logits(self, layer, q, keys):
        b, h = keys.shape[:2]
        q = q.view(b, h, q.shape[1] // h, q.shape[2], 1)
        return torch.einsum("bhgrd,bhsd->bhgrs", q, keys)


def _observation(n_sink_span: tuple[int, int]) -> LayerObservation:
    # one KV head shared by two query heads; cache slots 0..2 are context, 3..4 the probe rows.
    # keys 0, ln2, ln4, 0, 0 (slot 3 and 4 keys: 0). queries: row 0 = (1, -1), row 1 = (0, 0)
    keys = torch.tensor([0.0, math.log(2), math.log(4), 0.0, 0.0]).view(1, 1, 5, 1)
    hidden = torch.tensor([[[1.0, -1.0], [0.0, 0.0]]])  # [B, rows, Hq]
    layout = StepLayout(
        context_length=3,
        block_index=0,
        n_blocks=1,
        block_start=0,
        block_end=3,
        n_past=0,
        n_question=0,
        context_index=torch.arange(3).view(1, 1, 3),
    )
    return LayerObservation(
        layer_idx=0,
        n_layers=1,
        adapter=_DotAdapter(),
        hidden=hidden,
        positions=torch.tensor([3, 4]),
        keys=keys,
        n_past=3,
        question_rows=None,
        observation_window=64,
        layout=layout,
        probe=Probe(ids=torch.tensor([7, 8]), span=n_sink_span),
    )


def test_reconstruction_scores_by_hand():
    obs = _observation((1, 3))
    # n_sink=1: keys seen = slot 0 (sink), slots 1-2 (span), slots 3-4 (probe, causal)
    # row 0 (slot 3), head a (q=1): exp 1, 2, 4, 1 -> 1/8, 2/8, 4/8, 1/8
    # row 0, head b (q=-1): exp 1, 1/2, 1/4, 1 -> span weights (1/2)/2.75, (1/4)/2.75
    # row 1 (slot 4), q=0 in both heads: uniform over 5 keys, 1/5 each
    # max over rows and heads: slot 1 max(2/8, 0.5/2.75, 1/5) = 1/4, slot 2 = 1/2
    torch.testing.assert_close(
        reconstruction_scores(obs, n_sink=1), torch.tensor([[0.25, 0.5]]), rtol=0, atol=1e-6
    )
    # no sink: slot 0 leaves the softmax; row 0 head a: exp 2, 4, 1 -> 2/7, 4/7; row 1: 1/4
    torch.testing.assert_close(
        reconstruction_scores(obs, n_sink=0), torch.tensor([[2 / 7, 4 / 7]]), rtol=0, atol=1e-6
    )
    # the span is the sink bound: a span starting at 0 has no sink even with n_sink=4
    whole = reconstruction_scores(_observation((0, 3)), n_sink=4)
    # row 0 head a: exp 1, 2, 4, 1 -> 1/8, 1/4, 1/2; row 1: 1/5 each -> slot 0: max(1/8,
    # head b 1/2.75, 1/5) = 1/2.75
    torch.testing.assert_close(whole, torch.tensor([[1 / 2.75, 0.25, 0.5]]), rtol=0, atol=1e-6)


def test_observe_fills_the_span_and_keeps_earlier_chunks():
    obs = _observation((1, 3))
    scorer = KVzipScorer(n_sink=1)
    assert scorer.observe(attrs.evolve(obs, probe=None)) is None  # the prefill scores nothing
    earlier = torch.tensor([[9.0, 0.0, 0.0]])
    out = scorer.observe(attrs.evolve(obs, previous=earlier))
    torch.testing.assert_close(out, torch.tensor([[9.0, 0.25, 0.5]]), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- probes


def test_probes_repeat_the_context_chunk_by_chunk():
    tok = TinyTokenizer()
    ctx = torch.tensor(_chars("abcdefghijkl"))
    probes = reconstruction_probes(ctx, tok, chunk_size=5)
    assert [p.span for p in probes] == [(0, 5), (5, 10), (10, 12)]
    newline = _chars("\n")  # the suffix without a chat template
    assert probes[0].ids.tolist() == _chars(FIRST_PROMPT) + newline + _chars("abcde")
    # later chunks quote the previous chunk's last tokens (8, or the whole chunk if shorter)
    assert probes[1].ids.tolist() == _chars(NEXT_PROMPT) + _chars("abcde") + newline + _chars(
        "fghij"
    )
    assert probes[2].ids.tolist() == _chars(NEXT_PROMPT) + _chars("fghij") + newline + _chars("kl")
    long = reconstruction_probes(ctx, tok, chunk_size=10)
    assert long[1].ids.tolist() == _chars(NEXT_PROMPT) + _chars("cdefghij") + newline + _chars("kl")


class _TemplateTokenizer(TinyTokenizer):
    chat_template = "<sys>{user}</u><a>"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize, **kwargs):
        assert kwargs == {"enable_thinking": False} and not tokenize and add_generation_prompt
        return "<sys>" + messages[0]["content"] + "</u><a>"


def test_chat_template_prefix_is_not_reconstructed():
    tok = _TemplateTokenizer()
    assert template_parts(tok) == (_chars("<sys>"), _chars("</u><a>"))
    templated = torch.tensor(_chars("<sys>hello"))
    (probe,) = reconstruction_probes(templated, tok, chunk_size=100)
    assert probe.span == (5, 10)
    assert probe.ids.tolist() == _chars(FIRST_PROMPT) + _chars("</u><a>") + _chars("hello")
    # a context that does not start with the prefix is reconstructed whole
    (raw,) = reconstruction_probes(torch.tensor(_chars("hello")), tok, chunk_size=100)
    assert raw.span == (0, 5)
    with pytest.raises(ConfigError, match=r"kvzip: the context \(5 tokens\) holds nothing"):
        reconstruction_probes(torch.tensor(_chars("<sys>")), tok, chunk_size=100)


# ---------------------------------------------------------------- brute-force reference


def engine_scores(
    lm, segments, chunk_size: int, query_agnostic: bool, spec: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kvzip scores the engine computes (read through a recording selector), and the kept
    context positions."""
    policy = load_policy(spec or f"kvzip:keep_ratio=0.5,chunk_size={chunk_size}")
    comp = policy.compose()
    seen = {}
    selector = comp.selector

    class Recording(type(selector)):
        def select(self, source, candidates, k):
            seen["scores"] = source.scores("main", candidates)
            return super().select(source, candidates, k)

    recording = Recording(scorer="main", granularity="head")
    state = prefill_and_compress(
        lm, attrs.evolve(comp, selector=recording), segments, query_agnostic=query_agnostic
    )
    return seen["scores"], state.context_index


@torch.no_grad()
def _eager_reference(lm, context_ids, chunk_size: int, n_sink: int = 4) -> torch.Tensor:
    """KVzip scores from the eager model's own attention weights, one full forward per chunk.

    For each chunk, ``context + probe`` runs in one forward without a cache; the weights of the
    probe rows are restricted to the sinks, the chunk and the probe, renormalised (the softmax
    over a subset), and maximised over rows and the query heads of each KV head.
    """
    cfg = lm.model.config
    h = cfg.num_key_value_heads
    g = cfg.num_attention_heads // h
    L = context_ids.numel()
    out = torch.zeros(cfg.num_hidden_layers, h, L)
    for probe in reconstruction_probes(context_ids, lm.tokenizer, chunk_size):
        ids = torch.cat([context_ids, probe.ids])
        att = lm.model(input_ids=ids[None], output_attentions=True).attentions
        s, e = probe.span
        cols = torch.cat(
            [torch.arange(min(n_sink, s)), torch.arange(s, e), torch.arange(L, ids.numel())]
        )
        for layer, a in enumerate(att):
            w = a[0][:, L:][:, :, cols]  # [Hq, rows, subset]
            w = w / w.sum(-1, keepdim=True)
            span = w[..., min(n_sink, s) : min(n_sink, s) + e - s]
            out[layer, :, s:e] = span.reshape(h, g, *span.shape[1:]).amax(dim=(1, 2))
    return out


@pytest.mark.parametrize(("chunk_size", "query_agnostic"), [(2048, True), (40, False)])
def test_scores_equal_eager_attention_weights(chunk_size, query_agnostic):
    lm = tiny_model("qwen2", seed=3, attn="eager", layers=2, heads=4, kv_heads=2)
    segments = build_prompt(lm.tokenizer, CONTEXT, QUESTION)
    ours, _ = engine_scores(lm, segments, chunk_size, query_agnostic)
    L = segments.context_length
    assert ours.shape[-1] == L + (0 if query_agnostic else segments.question_length)
    expected = _eager_reference(lm, segments.context_ids, chunk_size)
    torch.testing.assert_close(ours[..., :L], expected, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- policy behaviour


def test_question_is_not_scored_and_kept_sets_are_query_agnostic():
    lm = tiny_model("llama", seed=1)
    segments = build_prompt(lm.tokenizer, CONTEXT, QUESTION)
    policy = load_policy("kvzip:keep_ratio=0.3")
    aware = prefill_and_compress(lm, policy, segments)
    agnostic = prefill_and_compress(lm, policy, segments, query_agnostic=True)
    assert torch.equal(aware.context_index, agnostic.context_index)
    other = build_prompt(lm.tokenizer, CONTEXT, "Where does the dog sleep tonight?")
    assert torch.equal(prefill_and_compress(lm, policy, other).context_index, aware.context_index)
    # the 4 sinks are kept and each KV head keeps its own set
    assert bool((aware.context_index[..., :4] == torch.arange(4)).all())
    assert not bool((aware.context_index == aware.context_index[:, :1]).all())


def test_probe_cost_is_reported():
    lm = tiny_model("llama", seed=1)
    segments = build_prompt(lm.tokenizer, CONTEXT, QUESTION)
    state = prefill_and_compress(lm, load_policy("kvzip:keep_ratio=0.3"), segments)
    assert 0 < state.probe_s <= state.compress_s
    # the probe's KV sits after the context while it runs: instruction, newline, repeat (L)
    L = segments.context_length
    assert state.peak_kv_tokens == L + len(_chars(FIRST_PROMPT + "\n")) + L
    other = prefill_and_compress(lm, load_policy("random:keep_ratio=0.3"), segments)
    assert other.probe_s == 0.0
    # the answer's record carries it too (kvlab run --json, compare rows)
    result = run_segments(lm, load_policy("kvzip:keep_ratio=0.3"), segments, max_new_tokens=2)
    assert 0 < result.probe_s <= result.compress_s
    assert result.to_dict(indices=False)["probe_s"] == round(result.probe_s, 6)


def test_probe_pass_leaves_the_cache_as_it_was():
    lm = tiny_model("llama", seed=1)
    adapter = adapter_for(lm.model)
    segments = build_prompt(lm.tokenizer, CONTEXT, QUESTION)
    ids = segments.full_ids()
    cache = adapter.new_cache()
    n = ids.numel()
    adapter.forward(ids, cache, torch.arange(n), torch.arange(n))
    before = [tuple(t.clone() for t in adapter.layer_kv(cache, i)) for i in range(2)]
    comp = load_policy("kvzip:keep_ratio=0.3").compose()
    L, Q = segments.context_length, segments.question_length
    layout = StepLayout(
        context_length=L,
        block_index=0,
        n_blocks=1,
        block_start=0,
        block_end=L,
        n_past=0,
        n_question=Q,
        context_index=torch.cat([torch.arange(L), torch.full((Q,), -1)]).expand(2, 2, -1),
    )
    inputs = ProbeInputs(context_ids=segments.context_ids, tokenizer=lm.tokenizer)
    observed = run_probes(adapter, comp, cache, layout, {"main": [None, None]}, inputs)
    for i, (keys, values) in enumerate(before):
        assert torch.equal(adapter.layer_kv(cache, i)[0], keys)
        assert torch.equal(adapter.layer_kv(cache, i)[1], values)
    assert [o.shape for o in observed["main"]] == [torch.Size([2, L + Q])] * 2
    assert bool((observed["main"][0][:, L:] == 0).all()), "question slots are not scored"
    assert inputs.seconds > 0


def test_block_wise_prefill_is_refused():
    lm = tiny_model("llama", seed=1)
    comp = load_policy("kvzip:keep_ratio=0.3").compose()
    blockwise = attrs.evolve(comp, engine=EngineOptions(block_size=64))
    segments = build_prompt(lm.tokenizer, CONTEXT, QUESTION)
    with pytest.raises(ConfigError, match=r"block-wise prefill \(4 blocks\) is not supported"):
        prefill_and_compress(lm, blockwise, segments)


def test_policy_record_and_validation():
    assert repr(load_policy("kvzip:keep_ratio=0.25")) == (
        "KVzipPolicy(keep_ratio=0.25, budget=None, decode_interval=None, decode_budget=None, "
        "n_sink=4, chunk_size=2048)"
    )
    with pytest.raises(ConfigError, match="chunk_size=0"):
        load_policy("kvzip:chunk_size=0")
    with pytest.raises(ConfigError, match=r"n_sink=-1 is invalid: it must be an integer >= 0"):
        load_policy("kvzip:n_sink=-1")
    with pytest.raises(ConfigError, match=r"kvzip: decode_interval=8 .* leave decode_interval"):
        load_policy("kvzip:decode_interval=8,decode_budget=64")


@pytest.mark.parametrize("query_agnostic", [False, True])
def test_keep_ratio_one_answers_like_full(query_agnostic):
    lm = tiny_model("qwen2", seed=2)
    kw = dict(max_new_tokens=10, query_agnostic=query_agnostic)
    full = run(lm, "full", CONTEXT, QUESTION, **kw)
    kvzip = run(lm, "kvzip:keep_ratio=1", CONTEXT, QUESTION, **kw)
    assert kvzip.answer_token_ids == full.answer_token_ids
    assert (
        kvzip.kept_tokens
        == full.kept_tokens
        == build_prompt(lm.tokenizer, CONTEXT, QUESTION).context_length
    )


def test_conformance():
    check_policy("kvzip")


def test_shared_prefill_runs_the_probe_too():
    lm = tiny_model("llama", seed=1)
    segments = build_prompt(lm.tokenizer, CONTEXT, QUESTION)
    policies = [load_policy("kvzip:keep_ratio=0.3"), load_policy("random:keep_ratio=0.3")]
    shared = list(run_shared(lm, policies, segments, max_new_tokens=4))
    for policy, got in zip(policies, shared, strict=True):
        want = run_segments(lm, policy, segments, max_new_tokens=4)
        assert torch.equal(got.kept_indices, want.kept_indices), policy
        assert got.answer_token_ids == want.answer_token_ids, policy
        assert got.peak_kv_bytes == want.peak_kv_bytes, policy
