"""The compression engine: prefill (one-shot or block-wise), compress in place, answer.

One loop serves every policy. The context is cut into blocks (a single block in one-shot mode);
each block is run with the question appended (question-aware protocol), then one compression step
keeps ``protected | selected`` slots and drops the rest, the question included. Tokens keep their
original positions unless the policy asks for contiguous positions, in which case the kept keys
are re-rotated. Finally the question is fed over the compressed cache and the answer decoded
greedily with positions continuing after the context.

Layer-wise compression: when every plugin that decides a step says its decision for a layer
depends on that layer alone (:attr:`Scorer.layer_local`, :attr:`Selector.layer_local`), the step
runs inside the forward pass instead of after it. Each layer is compressed as soon as its
attention has run (the adapter's :meth:`~kvpress_lab.adapters.base.ModelAdapter.on_attention_done`
hook), so the cache holds one full layer at a time plus the compressed ones before it, as NVIDIA
kvpress does. The kept slots are the same as compressing after the pass; only the peak differs.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import attrs
import torch

from kvpress_lab.adapters import ModelAdapter, adapter_for
from kvpress_lab.engine.cache import gather_slots, keep_layer_slots, keep_mask_to_indices
from kvpress_lab.engine.checks import (
    check_allocation,
    check_scores,
    check_selection,
    equal_counts,
)
from kvpress_lab.engine.observe import Observer
from kvpress_lab.errors import ConfigError, ContextTooLongError
from kvpress_lab.interfaces import (
    Allocation,
    LayerObservation,
    Probe,
    Scorer,
    ScoreSource,
    StepLayout,
    take_slots,
)
from kvpress_lab.models import LoadedModel
from kvpress_lab.ops.rope import AngleTables, rerotate_keys
from kvpress_lab.policy import Composition, Policy
from kvpress_lab.prompt import PromptSegments

__all__ = [
    "CompressedContext",
    "ProbeInputs",
    "StepOutcome",
    "check_fits",
    "check_supported",
    "compress_step",
    "compresses_layerwise",
    "prefill_and_compress",
]


@attrs.define
class CompressedContext:
    """The state after prefill and compression, ready for answering."""

    cache: object  # the transformers cache, read and written through the adapter
    context_index: torch.Tensor  # [Ly, H, k] context position held by every kept slot
    next_position: int  # position of the first question token when answering
    context_length: int
    held_tokens: int  # slots in the cache per layer and head (kept context + a kept question)
    peak_kv_tokens: int  # most slots held at once during prefill (per layer and head)
    peak_kv_bytes: int
    prefill_s: float
    compress_s: float
    blocks: int
    # set when nothing was evicted in the last step and the question's KV could be kept
    question_logits: torch.Tensor | None = None
    # wall time of the scorers' probe passes (Scorer.probes), already counted in compress_s
    probe_s: float = 0.0
    # steps that compressed each layer inside the forward pass (layer-local plugins); the peak
    # above was then measured before each layer's compression: one full layer, the rest kept
    layerwise_steps: int = 0

    # [Ly, H] kept context tokens per layer and KV head when they differ (a ragged cache; the
    # rows of context_index are then padded with -1 after each row's count), None when equal
    kept_counts: torch.Tensor | None = None

    @property
    def kept_tokens(self) -> float:
        """Kept context tokens per layer and KV head (the mean when rows differ)."""
        if self.kept_counts is not None:
            return float(self.kept_counts.double().mean())
        return int(self.context_index.shape[-1])


class _Scores(ScoreSource):
    """Scores of a step; ``first_layer`` is the model layer of the layout's layer 0 (layer-wise)."""

    def __init__(
        self,
        scorers: Mapping[str, Scorer],
        layout,
        observed,
        adapter: ModelAdapter,
        cache,
        first_layer: int = 0,
    ) -> None:
        self._scorers, self._layout, self._observed = scorers, layout, observed
        self._adapter, self._cache, self._first = adapter, cache, first_layer

    def scores(self, name: str, candidates: torch.Tensor) -> torch.Tensor:
        scorer = self._scorers[name]
        out = scorer.score(
            self._layout,
            self._observed[name],
            candidates,
            lambda i: self._adapter.layer_kv(self._cache, self._first + i)[0],
        )
        return check_scores(out, candidates, self._layout, scorer.name)


def check_fits(lm: LoadedModel, segments: PromptSegments, max_new_tokens: int) -> None:
    """Refuse prompts longer than the model's positions before any model work."""
    limit = lm.max_positions
    total = segments.context_length + segments.question_length + max_new_tokens
    if limit is not None and total > limit:
        raise ContextTooLongError(
            f"context ({segments.context_length} tokens) + question ({segments.question_length}) + "
            f"answer ({max_new_tokens}) = {total} tokens exceeds {lm.name}'s maximum of {limit} "
            "positions; shorten the context or use a model with a longer context"
        )


def check_supported(
    adapter: ModelAdapter,
    comp: Composition,
    segments: PromptSegments,
    max_new_tokens: int,
    query_agnostic: bool,
    policy_name: str | None = None,
    decode_compression: bool = False,
) -> None:
    """Refuse, before any model work, what the model's adapter cannot run exactly.

    Also refuses a selector that pools heads (so heads keep different counts: a ragged cache)
    together with what a ragged cache cannot do: block-wise prefill, contiguous positions,
    decode-time eviction or generation-time compression (``decode_compression``). A budgeter's
    unequal counts are refused by :func:`prefill_and_compress` before each step's forward pass
    (budgeters are asked once per step, never ahead). ``policy_name`` names the policy in the
    message (the budgeter's name otherwise).
    """
    L = segments.context_length
    block = comp.engine.block_size
    multi_block = block is not None and block < L
    original = comp.engine.position_mode == "original"
    adapter.check_run(
        total_tokens=L + segments.question_length + max_new_tokens,
        position_jumps=multi_block and original and not query_agnostic,
        rerotates=not original,
    )
    cannot = _ragged_limits(comp, L, decode_compression)
    if cannot and comp.selector.pools_heads:
        _refuse_unequal(
            policy_name or comp.budgeter.name,
            f"selector {comp.selector.name!r} pools each layer's budget across its KV heads "
            "(heads keep different counts)",
            cannot[0],
        )


def _ragged_limits(
    comp: Composition, context_length: int, decode_compression: bool = False
) -> list[tuple[str, str]]:
    """What this run does that a ragged cache cannot follow: (what, fix) pairs."""
    block = comp.engine.block_size
    cannot = []
    if block is not None and block < context_length:
        cannot.append(
            (
                f"block-wise prefill (block_size={block} over {context_length} tokens)",
                "use block_size=None (one-shot compression)",
            )
        )
    if comp.engine.position_mode != "original":
        cannot.append(("position_mode='contiguous'", "use position_mode=original"))
    if comp.decode_evictor is not None:
        cannot.append(("decode-time eviction", "turn the policy's decode eviction off"))
    if decode_compression:
        cannot.append(
            ("generation-time compression (decode_interval)", "drop decode_interval/decode_budget")
        )
    return cannot


def _refuse_unequal(who: str, reason: str, cannot: tuple[str, str]) -> None:
    what, fix = cannot
    raise ConfigError(
        f"{who}: {reason}, so its cache would be ragged, and {what} cannot run over a ragged "
        f"cache; {fix} or use an equal-count budgeter"
    )


def _check_step_counts(
    who: str, comp: Composition, layout: StepLayout, allocation: Allocation, cannot
) -> None:
    """Refuse, before the step's forward pass, an allocation whose rows keep different counts
    when the run cannot hold a ragged cache (``cannot``: see :func:`_ragged_limits`)."""
    if not cannot:
        return
    kept = allocation.kept_counts(layout)
    if _equal(kept):
        return
    step = f" from block {layout.block_index} of {layout.n_blocks}" if layout.block_index else ""
    _refuse_unequal(
        who,
        f"budgeter {comp.budgeter.name!r} keeps between {int(kept.min())} and "
        f"{int(kept.max())} tokens per layer/KV head{step}",
        cannot[0],
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def prefill_and_compress(
    lm: LoadedModel,
    policy: Policy | Composition,
    segments: PromptSegments,
    query_agnostic: bool = False,
    layerwise: bool = True,
    policy_name: str | None = None,
) -> CompressedContext:
    """Run the policy's prefill and compression over the context segment.

    ``layerwise=False`` always compresses after the forward pass, even where the plugins allow
    compressing each layer inside it (:func:`compresses_layerwise`); the kept slots are the same.
    ``policy_name`` names the policy in refusals when ``policy`` is a composition.
    """
    comp = policy.compose() if isinstance(policy, Policy) else policy
    model, device = lm.model, lm.device
    ctx = segments.context_ids.to(device)
    question = segments.question_ids.to(device)
    L = int(ctx.numel())
    comp.budgeter.validate(L)
    adapter = adapter_for(model)
    who = policy.name if isinstance(policy, Policy) else policy_name or comp.budgeter.name
    check_supported(adapter, comp, segments, 0, query_agnostic, policy_name=who)
    cannot = _ragged_limits(comp, L)
    n_layers, n_kv = adapter.n_layers, adapter.n_kv_heads
    block = comp.engine.block_size or L
    bounds = [(s, min(s + block, L)) for s in range(0, L, block)]
    contiguous = comp.engine.position_mode == "contiguous"
    Q = 0 if query_agnostic else int(question.numel())

    cache = adapter.new_cache()
    # half-precision keys re-rotated chunk after chunk drift by one rounding per move; re-rotating
    # from the keys as computed keeps it at one rounding (dropped when the prefill ends)
    origins = KeyOrigins(adapter) if contiguous and len(bounds) > 1 else None
    context_index = torch.empty(n_layers, n_kv, 0, dtype=torch.long)
    prefill_s = compress_s = 0.0
    peak_tokens = peak_bytes = layerwise_steps = 0
    question_logits = counts = None
    probe_inputs = ProbeInputs(context_ids=ctx, tokenizer=lm.tokenizer)

    for bi, (b0, b1) in enumerate(bounds):
        n_past = int(context_index.shape[-1])
        ids = torch.cat([ctx[b0:b1], question[:Q]])
        n_in = int(ids.numel())
        if contiguous:
            positions = torch.arange(n_past, n_past + n_in, device=device)
        else:
            positions = torch.cat(
                [torch.arange(b0, b1, device=device), torch.arange(L, L + Q, device=device)]
            )
        new_index = torch.cat([torch.arange(b0, b1), torch.full((Q,), -1)])
        step_index = torch.cat([context_index, new_index.expand(n_layers, n_kv, -1)], dim=-1)
        layout = StepLayout(
            context_length=L,
            block_index=bi,
            n_blocks=len(bounds),
            block_start=b0,
            block_end=b1,
            n_past=n_past,
            n_question=Q,
            context_index=step_index,
        )
        allocation, evicts, observer = plan_step(adapter, cache, comp, layout, n_in, positions)
        _check_step_counts(who, comp, layout, allocation, cannot)
        per_layer = None
        # key origins re-rotate every layer of a step together: that path stays after the pass
        if (
            layerwise
            and origins is None
            and compresses_layerwise(comp, layout, allocation, evicts, probe_inputs)
        ):
            per_layer = LayerwiseStep(adapter, comp, cache, layout, allocation, observer)
            observer.after_layer = per_layer
        _sync(device)
        t0 = time.perf_counter()
        with observer.attached():
            logits = adapter.forward(
                ids, cache, positions, torch.arange(n_past, n_past + n_in, device=device)
            )
        _sync(device)
        t1 = time.perf_counter()
        peak_tokens = max(peak_tokens, n_past + n_in)
        peak_bytes = max(peak_bytes, adapter.kv_bytes(cache))

        if per_layer is None:
            outcome = compress_step(
                adapter,
                comp,
                cache,
                layout,
                allocation,
                evicts,
                observer.observed,
                logits[-1],
                last=bi == len(bounds) - 1,
                origins=origins,
                probe_inputs=probe_inputs,
            )
            context_index, question_logits = outcome.context_index, outcome.question_logits
            cache, counts = outcome.cache, outcome.counts
            inside = observer.seconds
        else:
            # measured inside the pass, before each layer was compressed
            peak_bytes = max(peak_bytes, per_layer.peak_bytes)
            context_index, question_logits = per_layer.kept_index(), None
            layerwise_steps += 1
            inside = observer.seconds + per_layer.seconds
        _sync(device)
        t2 = time.perf_counter()
        prefill_s += (t1 - t0) - inside
        compress_s += inside + (t2 - t1)

    return CompressedContext(
        cache=cache,
        held_tokens=int(context_index.shape[-1]),
        context_index=context_index[
            ..., : context_index.shape[-1] - (Q if question_logits is not None else 0)
        ],
        next_position=(int(context_index.shape[-1]) if contiguous else L),
        context_length=L,
        peak_kv_tokens=max(peak_tokens, probe_inputs.peak_tokens),
        peak_kv_bytes=max(peak_bytes, probe_inputs.peak_bytes),
        prefill_s=prefill_s,
        compress_s=compress_s,
        blocks=len(bounds),
        question_logits=question_logits,
        probe_s=probe_inputs.seconds,
        layerwise_steps=layerwise_steps,
        kept_counts=counts,
    )


def plan_step(
    adapter: ModelAdapter,
    cache: object,
    comp: Composition,
    layout: StepLayout,
    n_in: int,
    positions: torch.Tensor,
) -> tuple[Allocation, bool, Observer]:
    """Ask the budgeter for this step's allocation and prepare the scorers' observer.

    Scorers observe only when the step evicts something and the selector reads scores.
    """
    allocation = comp.budgeter.allocate(layout)
    _check_allocation(allocation, layout, comp.budgeter.name)
    evicts = _evicts(allocation, layout)
    used = (
        {n: comp.scorers[n] for n in comp.selector.scorer_names()}
        if allocation.selects and evicts
        else {}
    )
    Q = layout.n_question
    observer = Observer(
        adapter,
        cache,
        list(used.items()),
        layout,
        positions,
        question_rows=slice(n_in - Q, n_in) if Q else None,
        observation_window=comp.engine.observation_window,
    )
    return allocation, evicts, observer


def compresses_layerwise(
    comp: Composition,
    layout: StepLayout,
    allocation: Allocation,
    evicts: bool,
    probe_inputs: ProbeInputs | None = None,
) -> bool:
    """Whether this step can compress each layer inside the forward pass, asking the plugins.

    Allocations whose rows keep different counts (per-layer or per-head ``k``, uneven protected
    sets, a selector that pools heads) always compress after the pass. Otherwise it can when
    it evicts and either everything kept is protected (``k == 0``: no scores) or the
    selector and every scorer it reads declare themselves layer-local. Anything else (a
    model-wide selection, a consensus across layers, an undeclared third-party scorer) keeps the
    compress-after-prefill path. Probe passes (:meth:`Scorer.probes`) run over the whole cache
    after the forward, so a scorer asking for one (given ``probe_inputs``) keeps that path too.
    """
    if not evicts:
        return False
    if allocation.per_row or comp.selector.pools_heads:
        return False  # rows may keep different counts: the cache turns ragged after the pass
    if not _equal(allocation.kept_counts(layout)):
        return False
    if allocation.k == 0:
        return True
    if not comp.selector.layer_local:
        return False
    scorers = [comp.scorers[name] for name in comp.selector.scorer_names()]
    if not all(scorer.layer_local for scorer in scorers):
        return False
    if probe_inputs is None:
        return True
    ids, tokenizer = probe_inputs.context_ids, probe_inputs.tokenizer
    return not any(scorer.probes(layout, ids, tokenizer) for scorer in scorers)


class LayerwiseStep:
    """One compression step performed layer by layer inside the forward pass.

    Called by the observer's hook once layer ``l``'s attention has run and its scorers have
    observed it: measures the cache (one layer full, the layers before it compressed), asks the
    selector for layer ``l`` alone (a one-layer layout, allocation and scores), keeps the
    protected and selected slots of that layer and drops the rest, question included. The same
    checks as :func:`compress_step` run on every layer's selection. Selections are read on the
    host once per layer (once per step after the pass).
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        comp: Composition,
        cache: object,
        layout: StepLayout,
        allocation: Allocation,
        observer: Observer,
    ) -> None:
        self.adapter, self.comp, self.cache = adapter, comp, cache
        self.layout, self.allocation, self.observer = layout, allocation, observer
        self.indices: list[torch.Tensor | None] = [None] * adapter.n_layers
        self.peak_bytes = 0  # the most KV bytes held at once, measured before each layer's gather
        self.seconds = 0.0

    def __call__(self, layer: int) -> None:
        t0 = time.perf_counter()
        comp, alloc = self.comp, self.allocation
        self.peak_bytes = max(self.peak_bytes, self.adapter.kv_bytes(self.cache))
        layout = attrs.evolve(
            self.layout,
            context_index=self.layout.context_index[layer : layer + 1],
            first_layer=layer,
        )
        own = Allocation(
            protected=_layer_rows(alloc.protected, layer),
            candidates=_layer_rows(alloc.candidates, layer),
            k=alloc.k,
        )
        if own.k == 0:
            selected = torch.empty(1, 1, 0, dtype=torch.long)
        else:
            observed = {name: [seen[layer]] for name, seen in self.observer.observed.items()}
            source = _Scores(comp.scorers, layout, observed, self.adapter, self.cache, layer)
            selected = comp.selector.select(source, own.candidates.to(torch.bool), own.k)
        keep = _merge(own, selected, layout, comp.selector.name)
        indices = keep_mask_to_indices(keep, comp.budgeter.name)  # [1, H|1, k] on the host
        keep_layer_slots(self.adapter, self.cache, layer, indices[0])
        if comp.engine.position_mode == "contiguous":
            _rerotate_contiguous(
                self.adapter, self.cache, layout, layout.context_index, indices, None, layer
            )
        self.indices[layer] = indices
        self.seconds += time.perf_counter() - t0

    def kept_index(self) -> torch.Tensor:
        """[Ly, H, k] context position of every kept slot (after the pass)."""
        missing = [i for i, idx in enumerate(self.indices) if idx is None]
        if missing:  # a layer whose attention never ran: the adapter's hook is wrong
            raise RuntimeError(f"layer-wise compression never reached layers {missing}")
        n_kv = self.layout.context_index.shape[1]
        indices = torch.cat([idx.expand(1, n_kv, -1) for idx in self.indices])
        return _gather_index(self.layout.context_index, indices)


def _layer_rows(mask: torch.Tensor, layer: int) -> torch.Tensor:
    """Layer ``layer``'s rows of a [Ly|1, H|1, N] mask."""
    return mask[layer : layer + 1] if mask.shape[0] > 1 else mask


@attrs.frozen
class StepOutcome:
    """What one compression step left: the kept slots' context positions and the cache.

    ``context_index`` is ``[Ly, H, k]`` when every layer and KV head keeps ``k`` slots (the cache
    stays dense and ``counts`` is None). When rows keep different counts the cache was converted
    to the adapter's ragged cache (``cache`` is that new object), ``counts`` ``[Ly, H]`` holds each
    row's kept count and ``context_index`` is ``[Ly, H, max count]``, each row's positions in
    ascending order followed by ``-1`` padding.
    """

    context_index: torch.Tensor
    question_logits: torch.Tensor | None
    cache: object
    counts: torch.Tensor | None = None


def compress_step(
    adapter: ModelAdapter,
    comp: Composition,
    cache: object,
    layout: StepLayout,
    allocation: Allocation,
    evicts: bool,
    observed: Mapping[str, list],
    last_logits: torch.Tensor,
    last: bool,
    origins: KeyOrigins | None = None,
    probe_inputs: ProbeInputs | None = None,
    ragged: str | None = None,
    probed: dict[tuple, _Probed] | None = None,
) -> StepOutcome:
    """One compression step after a forward pass, on ``cache`` (in place while it stays dense).

    Returns the context index of the kept slots and, when nothing was evicted in the last step
    (question-aware, original positions), the question's last logits so they can be reused.

    When the kept counts differ between layers/heads, the dense cache is replaced by a ragged
    one (:meth:`~kvpress_lab.adapters.base.ModelAdapter.ragged_cache`; the outcome's ``cache``).
    That needs one-shot compression with original positions: ``ragged`` names what the caller
    runs when it cannot hold a ragged cache (block-wise prefill, generation-time compression),
    and such a step is refused with a ConfigError. Contiguous positions are always refused.

    ``probed`` (shared prefill): probe passes already run over this same cache by a policy whose
    scorers have equal settings and which read the same ``observed``; their results are reused
    (and their time and peak memory reported as this step's) instead of running them again.

    Host transfers: scores, top-k and the cache gathers stay on the model's device. The engine's
    validation (:mod:`kvpress_lab.engine.checks`) reads a constant number of values on the host
    per step, whatever the number of layers and heads: the selected indices come to the host once
    to be checked and merged with the protected slots, and go back to the device once. A ragged
    conversion reads the per-head kept slots on the host once.
    """
    contiguous = comp.engine.position_mode == "contiguous"
    step_index = layout.context_index
    if not evicts and last and layout.n_question and not contiguous:
        # nothing evicted: the question's KV and logits are exactly what re-feeding would give
        return StepOutcome(step_index, last_logits, cache)
    pools = comp.selector.pools_heads
    if not evicts:
        keep = ~layout.question_mask[:1, :1]
    elif not allocation.selects:
        # everything kept is protected: no scores were observed and none are needed
        keep = _merge(allocation, _no_selection(allocation, layout), layout, comp.selector.name)
    else:
        if probe_inputs is not None:
            observed = _probe_once(adapter, comp, cache, layout, observed, probe_inputs, probed)
        source = _Scores(comp.scorers, layout, observed, adapter, cache)
        selected = comp.selector.select(source, allocation.candidates.to(torch.bool), allocation.k)
        keep = _merge(allocation, selected, layout, comp.selector.name, pools)
    if not equal_counts(keep):
        return _ragged_step(adapter, comp, cache, layout, keep, ragged)
    indices = keep_mask_to_indices(keep, comp.budgeter.name)
    if origins is not None:
        origins.add_new_rows(cache, layout.n_past)
    device = adapter.layer_kv(cache, 0)[0].device
    gather_slots(adapter, cache, indices.to(device))  # one transfer, not one per layer
    if contiguous:
        _rerotate_contiguous(adapter, cache, layout, step_index, indices, origins)
    return StepOutcome(_gather_index(step_index, indices), None, cache)


def _no_selection(allocation: Allocation, layout: StepLayout) -> torch.Tensor:
    """The empty selection of a step that keeps only protected slots."""
    if allocation.per_row:
        return torch.zeros(1, 1, layout.n_slots, dtype=torch.bool)
    return torch.empty(1, 1, 0, dtype=torch.long)


def _refuse_ragged(comp: Composition, layout: StepLayout, keep: torch.Tensor, ragged) -> None:
    """Refuse a step whose rows keep different counts where a ragged cache cannot follow."""
    counts = keep.sum(-1)
    asked = (
        f"kept between {int(counts.min())} and {int(counts.max())} slots per layer/KV head "
        f"(budgeter {comp.budgeter.name!r}, selector {comp.selector.name!r})"
    )
    if comp.engine.position_mode == "contiguous":
        raise ConfigError(
            f"{asked} with position_mode='contiguous': a ragged cache keeps every key at its "
            "original position; use position_mode original or an equal-count budgeter"
        )
    if ragged is not None:
        raise ConfigError(f"{asked} {ragged}")
    if layout.n_blocks > 1:
        raise ConfigError(
            f"{asked} in block {layout.block_index} of {layout.n_blocks}: block-wise prefill "
            "over a ragged cache is not supported; use block_size=None (one-shot) or an "
            "equal-count budgeter"
        )


def _ragged_step(
    adapter: ModelAdapter,
    comp: Composition,
    cache: object,
    layout: StepLayout,
    keep: torch.Tensor,
    ragged: str | None,
) -> StepOutcome:
    """Replace the dense cache by a ragged one holding each row's kept slots."""
    _refuse_ragged(comp, layout, keep, ragged)
    n_layers, n_kv = adapter.n_layers, adapter.n_kv_heads
    full = keep.expand(n_layers, n_kv, layout.n_slots)
    slots = torch.arange(layout.n_slots)
    rows = [[slots[full[layer, head]] for head in range(n_kv)] for layer in range(n_layers)]
    positions = layout.context_index[0, 0]  # one block, original positions: slot i at position i
    ragged_cache = adapter.ragged_cache(cache, rows, positions)
    counts = full.sum(-1)
    width = int(counts.max())
    index = torch.full((n_layers, n_kv, width), -1, dtype=torch.long)
    for layer in range(n_layers):
        for head in range(n_kv):
            row = layout.context_index[layer, head, rows[layer][head]]
            index[layer, head, : row.numel()] = row
    return StepOutcome(index, None, ragged_cache, counts)


@attrs.define
class ProbeInputs:
    """What scorers' probes are built from (:meth:`Scorer.probes`), and the time they took."""

    context_ids: torch.Tensor  # [L] long, on the model's device
    tokenizer: object
    seconds: float = 0.0  # wall time of every probe pass so far (forward, scorers and trim)
    peak_tokens: int = 0  # most slots held during a probe pass (context and probe)
    peak_bytes: int = 0


def run_probes(
    adapter: ModelAdapter,
    comp: Composition,
    cache: object,
    layout: StepLayout,
    observed: Mapping[str, list],
    inputs: ProbeInputs,
) -> dict[str, list]:
    """Run the probe passes the selector's scorers ask for; return the updated observations.

    The question's KV (the last ``n_question`` slots) is set aside, each probe is fed right after
    the cached context (one forward pass per probe, so a scorer bounds memory by chunking its
    probes) with only its scorer observing, and the probe's KV is dropped after the pass. The
    cache ends exactly as it was. The wall time is added to ``inputs.seconds``.
    """
    observed = dict(observed)
    wanted = [
        (
            name,
            comp.scorers[name],
            comp.scorers[name].probes(layout, inputs.context_ids, inputs.tokenizer),
        )
        for name in comp.selector.scorer_names()
    ]
    wanted = [w for w in wanted if w[2]]
    if not wanted:
        return observed
    device = inputs.context_ids.device
    _sync(device)
    t0 = time.perf_counter()
    n_layers, n_ctx = adapter.n_layers, layout.n_slots - layout.n_question
    held = [adapter.layer_kv(cache, layer) for layer in range(n_layers)]
    _trim(adapter, cache, n_ctx)
    # the probe continues the context: after its last position (original) or its last slot
    start = layout.block_end if comp.engine.position_mode == "original" else n_ctx
    for name, scorer, probes in wanted:
        for probe in probes:
            n = int(probe.ids.numel())
            observer = Observer(
                adapter,
                cache,
                [(name, _ProbeObserver(scorer, probe, observed[name]))],
                layout,
                torch.arange(start, start + n, device=device),
                question_rows=None,
                observation_window=comp.engine.observation_window,
            )
            with observer.attached():
                adapter.forward(
                    probe.ids.to(device),
                    cache,
                    torch.arange(start, start + n, device=device),
                    torch.arange(n_ctx, n_ctx + n, device=device),
                )
            observed[name] = observer.observed[name]
            inputs.peak_tokens = max(inputs.peak_tokens, n_ctx + n)
            inputs.peak_bytes = max(inputs.peak_bytes, adapter.kv_bytes(cache))
            _trim(adapter, cache, n_ctx)
    for layer, (keys, values) in enumerate(held):  # the question's KV back in place
        adapter.set_layer_kv(cache, layer, keys, values)
    _sync(device)
    inputs.seconds += time.perf_counter() - t0
    return observed


def _probe_once(
    adapter: ModelAdapter,
    comp: Composition,
    cache: object,
    layout: StepLayout,
    observed: Mapping[str, list],
    inputs: ProbeInputs,
    probed: dict[tuple, _Probed] | None,
) -> Mapping[str, list]:
    """:func:`run_probes`, or the result of an identical earlier call recorded in ``probed``."""
    if probed is None:
        return run_probes(adapter, comp, cache, layout, observed, inputs)
    names = comp.selector.scorer_names()
    key = (
        id(observed),
        comp.engine.position_mode,
        comp.engine.observation_window,
        repr([(n, comp.scorers[n]) for n in names]),
    )
    earlier = probed.get(key)
    if earlier is None:
        before = inputs.seconds
        result = run_probes(adapter, comp, cache, layout, observed, inputs)
        probed[key] = _Probed(
            result, inputs.seconds - before, inputs.peak_tokens, inputs.peak_bytes
        )
        return result
    inputs.seconds += earlier.seconds
    inputs.peak_tokens = max(inputs.peak_tokens, earlier.peak_tokens)
    inputs.peak_bytes = max(inputs.peak_bytes, earlier.peak_bytes)
    return earlier.observed


@attrs.frozen
class _Probed:
    """One run of probe passes, kept for policies whose scorers are the same (shared prefill)."""

    observed: Mapping[str, list]
    seconds: float
    peak_tokens: int
    peak_bytes: int


def _trim(adapter: ModelAdapter, cache: object, n_slots: int) -> None:
    for layer in range(adapter.n_layers):
        keys, values = adapter.layer_kv(cache, layer)
        adapter.set_layer_kv(cache, layer, keys[:, :, :n_slots], values[:, :, :n_slots])


class _ProbeObserver(Scorer):
    """Hands a scorer its probe and its previous per-layer value during a probe pass."""

    name = "probe"

    def __init__(self, scorer: Scorer, probe: Probe, previous: list) -> None:
        self._scorer, self._probe, self._previous = scorer, probe, previous

    def observe(self, obs: LayerObservation) -> torch.Tensor | None:
        prev = self._previous[obs.layer_idx]
        return self._scorer.observe(attrs.evolve(obs, probe=self._probe, previous=prev))

    def score(self, layout, observed, candidates, cache_keys):  # never called
        raise NotImplementedError


def _broadcast(mask: torch.Tensor, layout: StepLayout) -> torch.Tensor:
    return mask.to(torch.bool).expand_as(layout.context_index)


def _evicts(allocation: Allocation, layout: StepLayout) -> bool:
    """Whether this step drops any context slot."""
    ctx = ~layout.question_mask
    kept = (_broadcast(allocation.protected, layout) & ctx).sum(-1) + allocation.k
    return bool((kept < ctx.sum(-1)).any())


def _check_allocation(allocation: Allocation, layout: StepLayout, who: str) -> None:
    check_allocation(allocation, layout, who)


def _merge(
    allocation: Allocation,
    selected: torch.Tensor,
    layout: StepLayout,
    who: str,
    pools_heads: bool = False,
) -> torch.Tensor:
    return check_selection(allocation, selected, layout, who, pools_heads)


def _equal(counts: torch.Tensor) -> bool:
    return bool((counts == counts.flatten()[0]).all())


def _gather_index(step_index: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    ly, h, _ = step_index.shape
    return step_index.gather(-1, indices.expand(ly, h, indices.shape[-1]))


class KeyOrigins:
    """Keys of a half-precision cache as the model computed them, with those positions.

    Re-rotating stored keys chunk after chunk rounds them to bf16/fp16 once per move, and the
    error grows with the number of moves (measured in tests/adapters/test_precision.py: 13x
    one rounding after 64 moves). Keeping the keys as computed lets every move start from them:
    one rotation, one rounding, whatever the number of chunks. Float32 caches need none of this.
    """

    def __init__(self, adapter: ModelAdapter) -> None:
        self.adapter = adapter
        self.keys: list[torch.Tensor | None] = [None] * adapter.n_layers
        self.positions: list[torch.Tensor | None] = [None] * adapter.n_layers  # [H, n] long
        self.end = 0  # every recorded position is below this (known on the host, never read)

    def add_new_rows(self, cache, n_past: int) -> None:
        """Record the rows of this forward pass (slots n_past.., at positions n_past..)."""
        for layer in range(self.adapter.n_layers):
            keys = self.adapter.layer_kv(cache, layer)[0]
            if keys.element_size() > 2:
                continue
            new = keys[:, :, n_past:]
            self.end = max(self.end, int(keys.shape[2]))
            pos = torch.arange(n_past, keys.shape[2], device=keys.device).expand(keys.shape[1], -1)
            if self.keys[layer] is not None:
                new = torch.cat([self.keys[layer], new], dim=2)
                pos = torch.cat([self.positions[layer], pos], dim=-1)
            self.keys[layer], self.positions[layer] = new, pos

    def take(self, layer: int, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keep slots ``idx`` [H|1, k]; return the kept keys as computed and their positions."""
        if self.keys[layer] is None:
            return None
        idx = idx.to(self.keys[layer].device)
        self.keys[layer] = take_slots(self.keys[layer], idx)
        heads = self.positions[layer].shape[0]
        self.positions[layer] = self.positions[layer].gather(-1, idx.expand(heads, -1))
        return self.keys[layer], self.positions[layer]


def _rerotate_contiguous(
    adapter: ModelAdapter,
    cache,
    layout,
    step_index,
    indices,
    origins: KeyOrigins | None,
    first_layer: int = 0,
) -> None:
    """Move kept keys from their current positions to 0..k-1.

    ``indices`` ([Ly|1, H|1, k], on the host after the engine's checks) is read on the host once
    per step, not per layer; the positions go to the device once, and one angle table per RoPE
    (per step) serves every layer that uses it. ``first_layer`` is the model layer of
    ``step_index``'s layer 0 (the layer-wise path moves one layer at a time).
    """
    n_layers, n_kv, _ = step_index.shape
    # current position of every slot: past slots sit at 0..n_past-1, new rows right after; a
    # kept slot's position is its slot number, so the kept positions are the indices themselves
    indices = indices.cpu()
    k = indices.shape[-1]
    old = indices.expand(n_layers, n_kv, k)
    new = torch.arange(k)
    unchanged = (old == new).all(-1).all(-1).tolist()  # one host read per step
    # heads share positions when the selection is per layer or global (origins' too: they
    # follow the same indices)
    shared = indices.shape[1] == 1
    device = adapter.layer_kv(cache, 0)[0].device
    old_dev, new_dev = old.to(device), new.to(device)
    # every old and new position of this step is below n_slots, origins' below their end
    end = layout.n_slots if origins is None else max(layout.n_slots, origins.end)
    tables = AngleTables(end, device)
    for local in range(n_layers):
        layer = first_layer + local
        origin = (
            None if origins is None else origins.take(layer, indices[min(local, len(indices) - 1)])
        )
        rope = adapter.rope(layer)
        if rope is None or unchanged[local]:
            continue
        keys, values = adapter.layer_kv(cache, layer)
        old_l = old_dev[local]
        if origin is not None:
            keys, old_l = origin
        pos = old_l[0] if shared else old_l
        keys = rerotate_keys(keys, pos, new_dev, rope, angles=tables(rope))
        adapter.set_layer_kv(cache, layer, keys, values)


def validate_policy(policy: Policy, context_length: int) -> None:
    """Raise ConfigError for impossible settings before loading any model."""
    comp = policy.compose()
    comp.budgeter.validate(context_length)
    if comp.engine.block_size is not None and comp.engine.block_size < 1:
        raise ConfigError(f"block_size={comp.engine.block_size} must be >= 1")
