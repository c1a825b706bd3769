"""Per-layer and per-head allocations through the engine, into a ragged cache (issue 11).

Hand-built plugins defined here: a budgeter with per-layer counts (PyramidKV's shape), one with
per-(layer, head) counts, and a selector that pools each layer's budget across its KV heads
(Ada-KV's shape, ``pools_heads = True``). Scores are hand-built, so the kept (layer, head,
position) sets are known exactly (a plain sort per row, written here). The answer over the
ragged cache is compared with the eager reference of tests/adapters/test_ragged_cache.py: a dense
full cache whose evicted slots are masked per head.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import pytest
import torch
from adapters.test_ragged_cache import CONTEXT, REFERENCE, _Reference, masked_eager
from kvlab_plugins.topk import TopKSelector

from kvpress_lab import prefill_and_compress
from kvpress_lab.adapters import adapter_for
from kvpress_lab.adapters.ragged_attention import attention_implementation
from kvpress_lab.adapters.ragged_cache import RaggedCache
from kvpress_lab.engine.api import run_segments
from kvpress_lab.engine.questions import answer_questions
from kvpress_lab.engine.shared import run_shared
from kvpress_lab.errors import ConfigError, PluginError
from kvpress_lab.interfaces import Allocation, Budgeter, Scorer, Selector, StepLayout
from kvpress_lab.policy import Composition, EngineOptions, Policy
from kvpress_lab.prompt import PromptSegments
from kvpress_lab.selection import topk_candidates
from kvpress_lab.spec import load_policy
from kvpress_lab.testing.tiny import ARCHS, tiny_model

SINKS = 2
STEPS = 32
LAYERS, KV_HEADS = 2, 2


def _scores(index: torch.Tensor) -> torch.Tensor:
    """Distinct hand-built scores: every (layer, head) ranks the slots in its own order."""
    ly, h, n = index.shape
    slot = torch.arange(n, dtype=torch.float32)
    layer = torch.arange(ly, dtype=torch.float32)[:, None, None]
    head = torch.arange(h, dtype=torch.float32)[None, :, None]
    # head 1 scores higher in layer 0, head 0 in layer 1: a pooled selection favours them
    bias = 12 * torch.where(layer == 0, head, 1 - head)
    return torch.remainder(slot * (7 + 4 * layer + 2 * head) + 3 * layer, 53) + bias + slot / 1000


class HandScorer(Scorer):
    name: ClassVar[str] = "test_hand_scores"

    def score(self, layout, observed, candidates, cache_keys):
        return _scores(layout.context_index)


def _split(layout: StepLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """The first SINKS context slots protected, the rest of the context candidates."""
    ctx = ~layout.question_mask
    protected = ctx & (layout.context_index < SINKS)
    return protected, ctx & ~protected


@attrs.define
class LayerBudgeter(Budgeter):
    """``k`` per layer: the mean plus ``spread[l]`` (which sums to 0, so the total is exact)."""

    name: ClassVar[str] = "test_layer_counts"
    kept: int
    spread: tuple[int, ...] = (-5, 5)

    def target_tokens(self, context_length):
        return self.kept

    def allocate(self, layout):
        protected, candidates = _split(layout)
        k = torch.tensor([[self.kept - SINKS + d] for d in self.spread])
        return Allocation(protected, candidates, torch.minimum(k, candidates.sum(-1)[:, :1]))


@attrs.define
class HeadBudgeter(Budgeter):
    """``k`` per (layer, head), a fixed pattern around the mean."""

    name: ClassVar[str] = "test_head_counts"
    kept: int
    spread: tuple[tuple[int, ...], ...] = ((-7, 3), (6, -2))

    def target_tokens(self, context_length):
        return self.kept

    def allocate(self, layout):
        protected, candidates = _split(layout)
        k = torch.tensor([[self.kept - SINKS + d for d in row] for row in self.spread])
        return Allocation(protected, candidates, k)


@attrs.define
class EqualBudgeter(Budgeter):
    """The same ``k`` everywhere; as a tensor when ``as_tensor``."""

    name: ClassVar[str] = "test_equal_counts"
    kept: int
    as_tensor: bool = False

    def target_tokens(self, context_length):
        return min(self.kept, context_length)

    def allocate(self, layout):
        protected, candidates = _split(layout)
        k = min(self.kept, layout.context_length) - SINKS
        return Allocation(protected, candidates, torch.tensor([[k]]) if self.as_tensor else k)


@attrs.define
class PooledSelector(Selector):
    """Per layer, the ``sum of the layer's counts`` best candidates over all its KV heads."""

    name: ClassVar[str] = "test_pooled"
    pools_heads: ClassVar[bool] = True

    def scorer_names(self):
        return ("main",)

    def select(self, source, candidates, k):
        scores = source.scores("main", candidates)
        ly, h, n = scores.shape
        cand = candidates.expand(ly, h, n)
        total = (torch.as_tensor(k).expand(ly, h)).sum(-1)  # per layer
        flat = scores.masked_fill(~cand, float("-inf")).reshape(ly, h * n)
        mask = torch.zeros(ly, h * n, dtype=torch.bool)
        for layer in range(ly):
            mask[layer, flat[layer].topk(int(total[layer])).indices] = True
        return mask.view(ly, h, n)


@attrs.define
class MiscountingSelector(Selector):
    """Per-row top-k with one slot too many in layer 1, head 0 (breaks the counts)."""

    name: ClassVar[str] = "test_miscounting"

    def scorer_names(self):
        return ("main",)

    def select(self, source, candidates, k):
        mask = topk_candidates(source.scores("main", candidates), candidates, k).clone()
        free = (candidates.expand_as(mask) & ~mask)[1, 0].nonzero()[0]
        mask[1, 0, free] = True
        return mask


KINDS = {
    "layer": lambda kept: (LayerBudgeter(kept), TopKSelector(granularity="head")),
    "head": lambda kept: (HeadBudgeter(kept), TopKSelector(granularity="head")),
    "pooled": lambda kept: (EqualBudgeter(kept), PooledSelector()),
    "equal-tensor": lambda kept: (EqualBudgeter(kept, as_tensor=True), TopKSelector()),
    "miscount": lambda kept: (LayerBudgeter(kept), MiscountingSelector()),
}


@attrs.define(kw_only=True)
class HandPolicy(Policy):
    """One of the hand-built compositions above, with engine options."""

    name: ClassVar[str] = "test_adaptive"
    kind: str = "layer"
    kept: int = 20
    block_size: int | None = None
    position_mode: str = "original"
    evict: bool = False  # a decode-time evictor (never started: the run is refused first)

    def compose(self) -> Composition:
        budgeter, selector = KINDS[self.kind](self.kept)
        return Composition(
            budgeter=budgeter,
            selector=selector,
            scorers={"main": HandScorer()},
            engine=EngineOptions(block_size=self.block_size, position_mode=self.position_mode),
            decode_evictor=object() if self.evict else None,
        )


def _expected_rows(policy: HandPolicy, n_slots: int) -> list[list[list[int]]]:
    """The kept context positions per (layer, head), by sorting each row's scores here."""
    comp = policy.compose()
    index = torch.arange(n_slots).expand(LAYERS, KV_HEADS, n_slots)
    scores = _scores(index)
    budgeter = comp.budgeter
    k = torch.as_tensor(budgeter.allocate(_one_shot_layout(CONTEXT, n_slots - CONTEXT)).k).expand(
        LAYERS, KV_HEADS
    )
    rows = []
    for layer in range(LAYERS):
        if policy.kind == "pooled":
            pool = [
                (float(scores[layer, h, i]), h, i)
                for h in range(KV_HEADS)
                for i in range(SINKS, CONTEXT)
            ]
            best = sorted(pool, reverse=True)[: int(k[layer].sum())]
            chosen = [[i for _, hh, i in best if hh == h] for h in range(KV_HEADS)]
        else:
            chosen = [
                sorted(range(SINKS, CONTEXT), key=lambda i: -float(scores[layer, h, i]))[
                    : int(k[layer, h])
                ]
                for h in range(KV_HEADS)
            ]
        rows.append([list(range(SINKS)) + sorted(c) for c in chosen])
    return rows


def _one_shot_layout(n_ctx: int, n_q: int) -> StepLayout:
    index = torch.cat([torch.arange(n_ctx), torch.full((n_q,), -1)])
    return StepLayout(
        context_length=n_ctx, block_index=0, n_blocks=1, block_start=0, block_end=n_ctx,
        n_past=0, n_question=n_q, context_index=index.expand(LAYERS, KV_HEADS, -1),
    )  # fmt: skip


def _segments(seed: int = 11, n_q: int = 6) -> PromptSegments:
    gen = torch.Generator().manual_seed(seed)
    return PromptSegments(
        context_ids=torch.randint(3, 250, (CONTEXT,), generator=gen),
        question_ids=torch.randint(3, 250, (n_q,), generator=gen),
    )


@pytest.fixture(scope="module", autouse=True)
def _register_reference():
    from transformers import AttentionInterface

    AttentionInterface.register(REFERENCE, masked_eager)


def _model(arch: str):
    return tiny_model(arch, seed=3, layers=LAYERS, heads=4, kv_heads=KV_HEADS)


def _reference_logits(lm, segments: PromptSegments, rows, steps: int) -> list[torch.Tensor]:
    """Eager attention over a dense full cache, evicted context slots masked per head."""
    ad = adapter_for(lm.model)
    _Reference.keep = []
    for heads in rows:
        mask = torch.zeros(KV_HEADS, CONTEXT, dtype=torch.bool)
        for h, kept in enumerate(heads):
            mask[h, kept] = True
        _Reference.keep.append(mask)
    dense = ad.new_cache()
    pos = torch.arange(CONTEXT)
    ad.forward(segments.context_ids, dense, pos, pos)
    n_q = segments.question_length
    q_pos = torch.arange(CONTEXT, CONTEXT + n_q)
    out = []
    with attention_implementation(lm.model.config, REFERENCE):
        logits = ad.forward(segments.question_ids, dense, q_pos, q_pos)
        out.append(logits[-1])
        for step in range(steps):
            p = torch.tensor([CONTEXT + n_q + step])
            logits = ad.forward(logits[-1].argmax()[None], dense, p, p)
            out.append(logits[-1])
    return out


@pytest.mark.parametrize("kind", ["layer", "head", "pooled"])
@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_ragged_result_keeps_the_exact_sets_and_answers_like_the_masked_reference(arch, kind):
    lm = _model(arch)
    ad = adapter_for(lm.model)
    segments = _segments()
    policy = HandPolicy(kind=kind)
    state = prefill_and_compress(lm, policy, segments)
    want = _expected_rows(policy, CONTEXT + segments.question_length)

    # exact kept (layer, head, position) sets, padded with -1 after each row's count
    counts = [[len(r) for r in heads] for heads in want]
    assert state.kept_counts.tolist() == counts
    assert len({c for row in counts for c in row}) > 1  # really unequal
    for layer in range(LAYERS):
        for head in range(KV_HEADS):
            row = state.context_index[layer, head]
            n = counts[layer][head]
            assert row[:n].tolist() == want[layer][head]
            assert (row[n:] == -1).all()
    # fairness: the total over layers and heads is the uniform budget's
    assert state.kept_tokens == policy.kept

    # the cache is ragged: per-head lengths and bytes are the kept rows, nothing more
    cache = state.cache
    assert isinstance(cache, RaggedCache)
    assert cache.layer_lengths() == counts
    head_dim = cache.layers[0].body_keys.shape[-1]
    element = torch.tensor([], dtype=lm.dtype).element_size()
    kept_bytes = sum(map(sum, counts)) * head_dim * 2 * element  # keys and values
    assert ad.kv_bytes(cache) == kept_bytes
    for layer in range(LAYERS):
        for head in range(KV_HEADS):
            assert ad.head_positions(cache, layer, head).tolist() == want[layer][head]

    # question prefill and 32 decode steps: logits equal the masked dense reference
    reference = _reference_logits(lm, segments, want, STEPS)
    n_q = segments.question_length
    q_pos = torch.arange(CONTEXT, CONTEXT + n_q)
    logits = ad.forward(segments.question_ids, cache, q_pos, q_pos)[-1]
    for step, expected in enumerate(reference):
        diff = (logits - expected).abs().max().item()
        assert diff <= 1e-5, f"{arch}/{kind}: step {step} differs by {diff}"
        if step == STEPS:
            break
        p = torch.tensor([CONTEXT + n_q + step])
        logits = ad.forward(logits.argmax()[None], cache, p, p)[-1]

    # the engine's own answer is the reference's greedy answer
    result = run_segments(lm, policy, segments, max_new_tokens=8)
    greedy = [int(x.argmax()) for x in reference[:8]]
    assert result.answer_token_ids == greedy[: len(result.answer_token_ids)]
    assert result.kept_counts.tolist() == counts
    assert result.kept_total == policy.kept * LAYERS * KV_HEADS
    assert result.kv_bytes_kept == kept_bytes  # measured before the question was appended


@torch.no_grad()
def test_equal_counts_in_a_tensor_still_give_a_dense_cache():
    lm = _model("llama")
    segments = _segments()
    state = prefill_and_compress(lm, HandPolicy(kind="equal-tensor"), segments)
    assert state.kept_counts is None and not isinstance(state.cache, RaggedCache)
    assert tuple(state.context_index.shape) == (LAYERS, KV_HEADS, 20)
    plain = prefill_and_compress(lm, HandPolicy(kind="layer", kept=20), segments)
    assert isinstance(plain.cache, RaggedCache)  # the same budget, spread: ragged


@torch.no_grad()
def test_nothing_evicted_answers_exactly_like_the_full_model():
    lm = _model("qwen3")
    segments = _segments(n_q=5)
    full = run_segments(lm, load_policy("full"), segments, max_new_tokens=12)
    for kind in ("layer", "head", "pooled"):
        # keep everything: the per-row counts are all the candidates, so nothing is evicted
        result = run_segments(lm, _KeepAll(kind=kind), segments, max_new_tokens=12)
        assert result.answer_token_ids == full.answer_token_ids
        assert result.kept_counts is None and result.kept_tokens == CONTEXT


@attrs.define
class _KeepAllBudgeter(Budgeter):
    """Per-layer or per-head counts that keep every candidate (the shape, not the eviction)."""

    name: ClassVar[str] = "test_keep_all_counts"
    per_head: bool

    def target_tokens(self, context_length):
        return context_length

    def allocate(self, layout):
        protected, candidates = _split(layout)
        n = candidates.sum(-1)  # [Ly, H]
        return Allocation(protected, candidates, n if self.per_head else n[:, :1])


@attrs.define(kw_only=True)
class _KeepAll(Policy):
    name: ClassVar[str] = "test_keep_all"
    kind: str = "layer"

    def compose(self) -> Composition:
        selector = PooledSelector() if self.kind == "pooled" else TopKSelector()
        return Composition(
            budgeter=_KeepAllBudgeter(per_head=self.kind == "head"),
            selector=selector,
            scorers={"main": HandScorer()},
        )


@torch.no_grad()
def test_several_questions_and_shared_prefill_over_a_ragged_cache():
    lm = _model("mistral")
    first = _segments(seed=11)
    questions = [first, PromptSegments(first.context_ids, torch.tensor([40, 41, 42, 43]))]
    policy = HandPolicy(kind="head")
    answers = answer_questions(lm, policy, questions, max_new_tokens=6)
    assert answers.prefills == 1
    for segments, result in zip(questions, answers.results, strict=True):
        alone = run_segments(lm, policy, segments, query_agnostic=True, max_new_tokens=6)
        assert result.answer_token_ids == alone.answer_token_ids
        assert torch.equal(result.kept_counts, alone.kept_counts)
        assert torch.equal(result.kept_indices, alone.kept_indices)
    segments = questions[0]
    shared = list(run_shared(lm, [policy, load_policy("snapkv:budget=20")], segments))
    alone = run_segments(lm, policy, segments)
    assert shared[0].answer_token_ids == alone.answer_token_ids
    assert torch.equal(shared[0].kept_indices, alone.kept_indices)
    assert shared[1].kept_counts is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"block_size": 16},
            r"^test_adaptive: budgeter 'test_layer_counts' keeps between 15 and 16 tokens per "
            r"layer/KV head, so its cache would be ragged, and block-wise prefill \(block_size=16 "
            r"over 48 tokens\) cannot run over a ragged cache; use block_size=None \(one-shot "
            r"compression\) or use an equal-count budgeter$",
        ),
        (
            {"position_mode": "contiguous"},
            r"^test_adaptive: budgeter 'test_layer_counts' keeps between 15 and 25 .* and "
            r"position_mode='contiguous' cannot run over a ragged cache; use "
            r"position_mode=original or use an equal-count budgeter$",
        ),
        (
            {"kind": "pooled", "block_size": 16},
            r"^test_adaptive: selector 'test_pooled' pools each layer's budget across its KV "
            r"heads \(heads keep different counts\), so its cache would be ragged, and block-wise",
        ),
        (
            {"evict": True},
            r"^test_adaptive: budgeter 'test_layer_counts' keeps between 15 and 25 .* and "
            r"decode-time eviction cannot run over a ragged cache; turn the policy's decode "
            r"eviction off or use an equal-count budgeter$",
        ),
        (
            {"decode_interval": 4, "decode_budget": 40},
            r"^test_adaptive: decode_interval=4,decode_budget=40 compresses a dense cache while "
            r"decoding, but test_adaptive gives layers/KV heads different counts \(budgeter "
            r"'test_layer_counts', selector 'topk'\); drop decode_interval/decode_budget or use "
            r"an equal-count budgeter$",
        ),
    ],
    ids=["block-wise", "contiguous", "pooled-block-wise", "decode-eviction", "decode-interval"],
)
def test_what_a_ragged_cache_cannot_do_is_refused_before_model_work(monkeypatch, changes, message):
    lm = _model("llama")
    calls = []
    monkeypatch.setattr(type(adapter_for(lm.model)), "forward", lambda *a, **k: calls.append(a))
    policy = attrs.evolve(HandPolicy(), **changes)
    with pytest.raises(ConfigError, match=message):
        run_segments(lm, policy, _segments())
    if policy.decode_interval is None:  # the engine alone never decodes: nothing to refuse
        with pytest.raises(ConfigError, match=message):
            prefill_and_compress(lm, policy, _segments())
    assert calls == []


@attrs.define
class LateBudgeter(Budgeter):
    """Equal counts in the first block, per-layer counts from the second on."""

    name: ClassVar[str] = "test_late_counts"

    def target_tokens(self, context_length):
        return 12

    def allocate(self, layout):
        protected, candidates = _split(layout)
        if layout.block_index == 0:
            return Allocation(protected, candidates, 10)
        return Allocation(protected, candidates, torch.tensor([[8], [12]]))


def test_unequal_counts_appearing_in_a_later_block_are_refused_before_its_forward(monkeypatch):
    lm = _model("llama")
    adapter_type = type(adapter_for(lm.model))
    forward, passes = adapter_type.forward, []

    def counted(self, ids, *args, **kwargs):
        passes.append(int(ids.numel()))
        return forward(self, ids, *args, **kwargs)

    monkeypatch.setattr(adapter_type, "forward", counted)
    comp = Composition(
        budgeter=LateBudgeter(),
        selector=TopKSelector(),
        scorers={"main": HandScorer()},
        engine=EngineOptions(block_size=16),
    )
    with pytest.raises(
        ConfigError,
        match=r"^test_late_counts: budgeter 'test_late_counts' keeps between 10 and 14 tokens per "
        r"layer/KV head from block 1 of 3, so its cache would be ragged, and block-wise prefill "
        r"\(block_size=16 over 48 tokens\) cannot run over a ragged cache; use block_size=None "
        r"\(one-shot compression\) or use an equal-count budgeter$",
    ):
        prefill_and_compress(lm, comp, _segments())
    assert passes == [16 + 6]  # block 0 and the question ran; block 1 never did


def test_a_selector_breaking_the_counts_is_refused_by_name():
    lm = _model("llama")
    with pytest.raises(
        PluginError,
        match=r"^selector 'test_miscounting' selected 24 slots in layer 1, KV head 0, where the "
        r"allocation asks for 23",
    ):
        prefill_and_compress(lm, HandPolicy(kind="miscount"), _segments())
    with pytest.raises(
        PluginError,
        match=r"^selector 'test_pooled' pools its budget across KV heads but selected",
    ):
        prefill_and_compress(lm, _OverPooled(), _segments())


class _OverPoolingSelector(PooledSelector):
    name: ClassVar[str] = "test_pooled"

    def select(self, source, candidates, k):
        mask = super().select(source, candidates, k).clone()
        mask[0, 0, candidates.expand_as(mask)[0, 0] & ~mask[0, 0]] = True  # every candidate
        return mask


@attrs.define(kw_only=True)
class _OverPooled(Policy):
    name: ClassVar[str] = "test_over_pooled"

    def compose(self) -> Composition:
        return Composition(
            budgeter=EqualBudgeter(20),
            selector=_OverPoolingSelector(),
            scorers={"main": HandScorer()},
        )


def test_kvlab_run_reports_the_per_layer_spread_and_ragged_rows(capsys, tiny_model_dir, tmp_path):
    import json

    from kvpress_lab.cli.main import main

    context = tmp_path / "context.txt"
    context.write_text("The grass is green. The sky is blue. The sun is yellow. " * 6)
    args = ["run", "--model", str(tiny_model_dir), "--policy", "adakv:keep_ratio=0.4"]
    args += ["--context-file", str(context), "--question", "Sky?", "--max-new-tokens", "2"]
    assert main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = [row for layer in data["kept_indices"] for row in layer]
    lengths = [len(row) for row in rows]
    assert len(set(lengths)) > 1  # heads keep different counts, written unpadded
    assert all(row == sorted(row) and min(row) >= 0 for row in rows if row)
    assert sum(lengths) == data["kept_total"]
    assert data["kept_tokens"] == pytest.approx(sum(lengths) / len(rows))
    per_layer = data["kept_per_layer"]
    assert data["kept_per_layer_range"] == pytest.approx(
        {"min": min(per_layer), "mean": sum(per_layer) / len(per_layer), "max": max(per_layer)}
    )
    assert main(args) == 0
    out = capsys.readouterr().out
    low, mean, high = data["kept_per_layer_range"].values()
    assert "kept / layer min-mean-max" in out
    assert f"{low:.1f} / {mean:.1f} / {high:.1f}" in out
