"""Layer-wise compression during prefill: same kept slots and answers, one layer full at a time.

Every shipped one-shot policy whose plugins declare themselves layer-local is run twice on tiny
models of several architectures: compressed inside the forward pass (the default) and after it
(``layerwise=False``). Kept indices and answers must be identical, and the peak KV must be the
measured value of one full layer plus the compressed layers before it, computed here by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
from kvlab_plugins.knorm import knorm_scores
from kvlab_plugins.sink_window import SinkWindowBudgeter
from kvlab_plugins.snapkv import SnapKVScorer
from kvlab_plugins.topk import TopKSelector
from tiny import tiny_model

from kvpress_lab import Composition, EngineOptions, build_prompt, load_policy, prefill_and_compress
from kvpress_lab.adapters import adapter_for
from kvpress_lab.engine.api import answer_compressed
from kvpress_lab.interfaces import Probe, Scorer, StepLayout

CONTEXT = "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. " * 4
QUESTION = "Which animal jumps?"

# every shipped one-shot policy built from layer-local plugins (checked against the registry below)
LAYER_LOCAL = [
    "snapkv:keep_ratio=0.3",
    "snapkv:keep_ratio=0.3,window=64,kernel=5,pooling=avg",
    "h2o:keep_ratio=0.3",
    "h2o:keep_ratio=0.3,decode_eviction=true",
    "tova:keep_ratio=0.3",
    "knorm:keep_ratio=0.3",
    "keydiff:keep_ratio=0.3",
    "expected_attention:keep_ratio=0.3",
    "streamingllm:keep_ratio=0.3",
    "streamingllm:keep_ratio=0.3,rerotate=false",
    "chunkkv:keep_ratio=0.3",
]
ARCHS = ["llama", "qwen3", "gemma3", "phi3"]


def per_slot_bytes(lm) -> int:
    """Bytes of one cache slot in one layer (keys and values of every KV head)."""
    adapter = adapter_for(lm.model)
    elem = torch.empty((), dtype=lm.dtype).element_size()
    return 2 * adapter.n_kv_heads * adapter.head_dim * elem


def both_paths(lm, spec: str, query_agnostic: bool = False, max_new_tokens: int = 8):
    segments = build_prompt(lm.tokenizer, CONTEXT, QUESTION, "Answer:")
    out = []
    for layerwise in (True, False):
        policy = load_policy(spec)
        comp = policy.compose()
        state = prefill_and_compress(
            lm, comp, segments, query_agnostic=query_agnostic, layerwise=layerwise
        )
        index = state.context_index.clone()
        result = answer_compressed(
            lm,
            policy,
            comp,
            segments,
            state,
            query_agnostic=query_agnostic,
            max_new_tokens=max_new_tokens,
        )
        out.append((state, index, result))
    return segments, out


# every policy on one architecture (in turn), SnapKV on every one: CPU time stays small
CASES = [(spec, ARCHS[i % len(ARCHS)]) for i, spec in enumerate(LAYER_LOCAL)] + [
    ("snapkv:keep_ratio=0.3", arch) for arch in ARCHS[1:]
]


@pytest.mark.parametrize(("spec", "arch"), CASES)
def test_layerwise_keeps_the_same_slots_and_answers(spec, arch):
    lm = tiny_model(arch, seed=3, layers=3)
    segments, [(lw, lw_index, lw_res), (after, after_index, after_res)] = both_paths(lm, spec)
    assert lw.layerwise_steps == 1 and after.layerwise_steps == 0
    assert torch.equal(lw_index, after_index)
    assert lw_res.answer_token_ids == after_res.answer_token_ids
    # measured peak: the last layer full (context + question), the layers before it compressed
    n_layers = adapter_for(lm.model).n_layers
    n_in = segments.context_length + segments.question_length
    slot = per_slot_bytes(lm)
    assert after.peak_kv_bytes == n_layers * n_in * slot
    assert lw.peak_kv_bytes == ((n_layers - 1) * lw.kept_tokens + n_in) * slot
    assert lw.peak_kv_bytes < after.peak_kv_bytes
    assert lw_res.peak_kv_bytes == lw.peak_kv_bytes  # the record carries the measured peak


@pytest.mark.parametrize("spec", ["snapkv:keep_ratio=0.25", "tova:keep_ratio=0.5"])
def test_layerwise_query_agnostic(spec):
    lm = tiny_model("qwen2", seed=4, layers=3)
    _, [(lw, lw_index, lw_res), (after, after_index, after_res)] = both_paths(
        lm, spec, query_agnostic=True
    )
    assert lw.layerwise_steps == 1
    assert torch.equal(lw_index, after_index)
    assert lw_res.answer_token_ids == after_res.answer_token_ids


def test_block_wise_original_positions_compress_every_block_layer_by_layer():
    lm = tiny_model("llama", seed=5, layers=3)
    segments = build_prompt(lm.tokenizer, CONTEXT, QUESTION)

    def comp():
        return Composition(
            budgeter=SinkWindowBudgeter(budget=40, sinks=2),
            selector=TopKSelector(scorer="main", granularity="head"),
            scorers={"main": SnapKVScorer(window=8)},
            engine=EngineOptions(block_size=96),
        )

    lw = prefill_and_compress(lm, comp(), segments)
    after = prefill_and_compress(lm, comp(), segments, layerwise=False)
    assert lw.blocks == after.blocks == 4
    assert lw.layerwise_steps == 4 and after.layerwise_steps == 0
    assert torch.equal(lw.context_index, after.context_index)
    assert lw.peak_kv_bytes < after.peak_kv_bytes


class UndeclaredKnorm(Scorer):
    """Key-norm scores (layer-local in fact) from a scorer that does not declare it."""

    name = "undeclared_knorm"

    def score(
        self,
        layout: StepLayout,
        observed: Sequence[torch.Tensor | None],
        candidates: torch.Tensor,
        cache_keys: Callable[[int], torch.Tensor],
    ) -> torch.Tensor:
        layers = layout.context_index.shape[0]
        return torch.stack([knorm_scores(cache_keys(i)[0]) for i in range(layers)])


class ProbingKnorm(UndeclaredKnorm):
    """Declares layer-locality but asks for a probe pass: the probe needs the whole cache."""

    name = "probing_knorm"
    layer_local = True

    def probes(self, layout, context_ids, tokenizer) -> Sequence[Probe]:
        return (Probe(ids=context_ids[:4]),)


def knorm_comp(scorer: Scorer, granularity: str = "head") -> Composition:
    return Composition(
        budgeter=SinkWindowBudgeter(keep_ratio=0.3),
        selector=TopKSelector(scorer="main", granularity=granularity),
        scorers={"main": scorer},
    )


@pytest.mark.parametrize(
    ("what", "comp"),
    [
        ("undeclared scorer", knorm_comp(UndeclaredKnorm())),
        ("scorer asking for probes", knorm_comp(ProbingKnorm())),
        ("model-wide selection", knorm_comp(SnapKVScorer(), granularity="global")),
    ],
)
def test_what_is_not_layer_local_keeps_compressing_after_the_prefill(what, comp):
    lm = tiny_model("llama", seed=6, layers=3)
    segments = build_prompt(lm.tokenizer, CONTEXT, QUESTION)
    state = prefill_and_compress(lm, comp, segments)
    assert state.layerwise_steps == 0, what
    n_in = segments.context_length + segments.question_length
    assert state.peak_kv_bytes == 3 * n_in * per_slot_bytes(lm)


def test_declared_knorm_goes_layerwise_with_the_same_slots_as_undeclared():
    lm = tiny_model("llama", seed=6, layers=3)
    segments = build_prompt(lm.tokenizer, CONTEXT, QUESTION)
    undeclared = prefill_and_compress(lm, knorm_comp(UndeclaredKnorm()), segments)
    declared = prefill_and_compress(lm, load_policy("knorm:keep_ratio=0.3"), segments)
    assert declared.layerwise_steps == 1 and undeclared.layerwise_steps == 0
    assert torch.equal(declared.context_index, undeclared.context_index)


# layer-local plugins whose allocation gives layers different counts: the cache turns ragged after
# the pass, so these steps compress after it (docs/api/interfaces.md, "Allocation shape");
# pyramidkv's fallback to one uniform count (short contexts) does run layer-wise
PER_LAYER_COUNTS = {"pyramidkv"}


@pytest.mark.parametrize(
    "spec", ["laserkv:keep_ratio=0.3", "random:keep_ratio=0.3", "pyramidkv:keep_ratio=0.3,window=4"]
)
def test_shipped_scorers_that_are_not_layer_local_keep_the_old_path(spec):
    lm = tiny_model("llama", seed=7, layers=3)
    segments = build_prompt(lm.tokenizer, CONTEXT, QUESTION)
    state = prefill_and_compress(lm, load_policy(spec), segments)
    assert state.layerwise_steps == 0


def test_every_layer_local_shipped_policy_is_tested_here():
    from kvpress_lab.registry import default_registry

    local = set()
    for name in default_registry().names("policy"):
        comp = load_policy(name).compose()
        scorers = [comp.scorers[n] for n in comp.selector.scorer_names()]
        if comp.selector.layer_local and all(s.layer_local for s in scorers):
            local.add(name)
    tested = {spec.split(":")[0] for spec in LAYER_LOCAL}
    # "full" evicts nothing: it never runs a compression step, layer-wise or not
    assert local - {"full"} - PER_LAYER_COUNTS == tested


@pytest.mark.parametrize("spec", ["snapkv:keep_ratio=0.3,window=8", "knorm:keep_ratio=0.3"])
def test_layerwise_host_reads_are_a_constant_number_per_layer(monkeypatch, spec):
    """Deciding inside the pass checks each layer's scores and selection on the host: the count
    grows with layers only (never with heads), and observe() reads nothing."""
    from test_hot_path import _record

    small, s_state = _record(monkeypatch, spec, True, layers=2, heads=4, kv_heads=2)
    large, l_state = _record(monkeypatch, spec, True, layers=4, heads=8, kv_heads=4)
    assert s_state.layerwise_steps == l_state.layerwise_steps == 1
    assert not small.events_in("observe") and not large.events_in("observe")
    for label in ("score", "select"):
        assert not large.events_in(label, transfers_only=True), large.report(large.events_in(label))
        assert 2 * len(small.events_in(label)) == len(large.events_in(label)), label
