"""Generation-time compression: keep the cache at a budget while the answer grows.

Long answers (reasoning, summaries) add one cache slot per generated token after the prompt was
compressed. With ``decode_interval=N`` and ``decode_budget=M`` set on any policy, the engine
compresses the whole cache (kept context, question and generated tokens alike) back to ``M``
slots every ``N`` generated tokens, so the cache never holds more than ``M + N`` slots while
decoding. Each compression is the engine's ordinary block step applied to the last ``N``
generated tokens: they are the block, their rows are the observation (the trailing
``observation_window`` of them for query-based scorers, as in the query-agnostic protocol of
SnapKV, Li et al. 2024, whose observation window is the prompt's end), and the policy's own
budgeter, scorers and selector decide what stays, through the same
:func:`~kvpress_lab.engine.runner.plan_step` / :func:`~kvpress_lab.engine.runner.compress_step`
calls as during prefill. Keys keep the positions they were computed at; nothing is re-rotated.

Slots are identified by their *sequence index*: context tokens ``0..L-1``, question tokens
``L..L+Q-1``, then generated tokens, in the order they were fed. That is the ``context_index``
of every decode step's :class:`~kvpress_lab.interfaces.StepLayout` (its ``context_length`` is the
number of tokens fed so far and it has no question slots), so budgeters protect sinks and recent
tokens of the whole sequence and selectors keep slots in sequence order.

The compression schedule resembles the eviction of H2O (Zhang et al., NeurIPS 2023) and of
StreamingLLM (Xiao et al., ICLR 2024) during generation, both of which evict after every token
(``N = 1``); a larger ``N`` amortizes the scoring over ``N`` tokens.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import attrs
import torch

from kvpress_lab.adapters import ModelAdapter
from kvpress_lab.engine.runner import compress_step, plan_step
from kvpress_lab.errors import ConfigError
from kvpress_lab.interfaces import Scorer, StepLayout
from kvpress_lab.policy import Composition, EngineOptions, Policy

_RAGGED_REFUSAL = (
    "during generation-time compression (decode_interval), which keeps a dense cache; drop "
    "decode_interval/decode_budget or use an equal-count budgeter"
)

__all__ = ["DecodeRecord", "GenerationCompressor", "GenerationPlan", "plan_generation"]


@attrs.define
class DecodeRecord:
    """What happened while decoding: the most slots held, and the compressions made."""

    peak_kv_tokens: int = 0  # most slots held at once after a decode forward pass (per layer)
    compressions: int = 0  # generation-time compressions that evicted something
    compress_s: float = 0.0  # time spent in them (scoring, selection, compaction)


@attrs.frozen
class GenerationPlan:
    """A validated generation-time compression setting of one policy."""

    interval: int
    budget: int
    composition: Composition  # the policy composed with ``budget=decode_budget``

    def start(
        self, adapter: ModelAdapter, cache: object, context_index: torch.Tensor, held: int, L: int
    ) -> GenerationCompressor:
        """A compressor for one answer over ``cache`` (``held`` slots, ``context_index`` [Ly,
        H, k] the kept context, any further slots being question tokens ``L..``)."""
        return GenerationCompressor(self, adapter, cache, context_index, held, L)


def plan_generation(
    policy: Policy, comp: Composition, context_length: int, question_length: int
) -> GenerationPlan | None:
    """Check a policy's ``decode_interval``/``decode_budget`` before any model work.

    Returns None when generation-time compression is off. Raises
    :class:`~kvpress_lab.errors.ConfigError` naming the value and the fix when the budget cannot
    hold what the prefill leaves, when the policy cannot evict down to it (it keeps everything
    or protects more), or when the policy already evicts while decoding by other means.
    """
    interval, budget = policy.decode_interval, policy.decode_budget
    if interval is None or budget is None:
        return None
    name = policy.name
    if comp.decode_evictor is not None:
        raise ConfigError(
            f"{name}: decode_interval={interval},decode_budget={budget} cannot be combined with "
            "the policy's own decode-time eviction; turn one of them off (e.g. "
            "decode_eviction=false)"
        )
    composition = _decode_composition(policy)
    held = comp.budgeter.target_tokens(context_length) + question_length
    if held > budget:
        raise ConfigError(
            f"{name}: decode_budget={budget} is smaller than the cache when decoding starts: "
            f"{held - question_length} kept context tokens + {question_length} question tokens "
            f"= {held}; raise decode_budget to at least {held} or keep fewer context tokens "
            "(keep_ratio/budget)"
        )
    probing = [
        n
        for n in composition.selector.scorer_names()
        if type(composition.scorers[n]).probes is not Scorer.probes
    ]
    if probing:
        raise ConfigError(
            f"{name}: decode_interval={interval},decode_budget={budget} cannot run the probe "
            f"passes of scorer(s) {probing}: they re-feed the whole context over the cache, "
            "which neither fits in decode_budget + decode_interval slots nor matches a cache "
            "that was already compressed; use a policy whose scorer observes the generated "
            "tokens (e.g. snapkv, tova, h2o)"
        )
    span = budget + interval  # the most slots a decode step sees
    try:
        composition.budgeter.validate(span)
    except ConfigError as err:
        raise ConfigError(f"{name}: decode_budget={budget} is not usable: {err}") from None
    keeps = composition.budgeter.target_tokens(span)
    if keeps > budget:
        raise ConfigError(
            f"{name}: decode_budget={budget} cannot be enforced: with budget={budget} the "
            f"policy keeps {keeps} of {span} tokens; use a policy that evicts (not {name})"
        )
    kept = _dry_allocation(_decode_composition(policy), span, interval)
    if kept is None:
        raise ConfigError(
            f"{name}: decode_interval={interval},decode_budget={budget} compresses a dense cache "
            f"while decoding, but {name} gives layers/KV heads different counts (budgeter "
            f"{composition.budgeter.name!r}, selector {composition.selector.name!r}); drop "
            "decode_interval/decode_budget or use an equal-count budgeter"
        )
    if kept > budget:
        raise ConfigError(
            f"{name}: decode_budget={budget} is smaller than the {kept} tokens the policy "
            f"protects in a decode step of {span} tokens; raise decode_budget to at least {kept} "
            "or protect fewer tokens (sinks, window)"
        )
    return GenerationPlan(interval=interval, budget=budget, composition=composition)


def _decode_composition(policy: Policy) -> Composition:
    """The policy composed with ``budget=decode_budget``; positions are never moved."""
    fields = attrs.fields(type(policy))
    if not fields.budget.init:
        raise ConfigError(
            f"{policy.name}: decode_budget={policy.decode_budget} cannot be enforced: "
            f"{policy.name} takes no budget (it keeps every token); use a policy that evicts"
        )
    changes = {"budget": policy.decode_budget, "decode_interval": None, "decode_budget": None}
    if fields.keep_ratio.init:
        changes["keep_ratio"] = fields.keep_ratio.default
    comp = attrs.evolve(policy, **changes).compose()
    return attrs.evolve(
        comp, engine=EngineOptions(observation_window=comp.engine.observation_window)
    )


def _dry_allocation(comp: Composition, span: int, interval: int) -> int | None:
    """Slots per layer and head the budgeter keeps in a decode step of ``span`` slots.

    None when the rows may keep different counts (per-row ``k`` or a selector pooling heads).
    """
    index = torch.arange(span).expand(1, 1, span)
    layout = StepLayout(
        context_length=span,
        block_index=0,
        n_blocks=1,
        block_start=span - interval,
        block_end=span,
        n_past=span - interval,
        n_question=0,
        context_index=index,
    )
    allocation = comp.budgeter.allocate(layout)
    protected = allocation.protected.to(torch.bool).expand(1, 1, span).sum(-1)
    if allocation.per_row or comp.selector.pools_heads:
        return None
    return int(protected.max()) + allocation.k


class GenerationCompressor:
    """Generation-time compression during one answer.

    The decode loop wraps every generated token's forward pass in :meth:`recording` (which
    captures each layer's attention input for that row) and then calls :meth:`after_forward`;
    every ``interval`` generated tokens, if the cache holds more than ``budget`` slots, the rows
    recorded since the last compression are observed by the policy's scorers and the cache is
    compressed back to ``budget`` slots.
    """

    def __init__(
        self,
        plan: GenerationPlan,
        adapter: ModelAdapter,
        cache: object,
        context_index: torch.Tensor,
        held: int,
        L: int,
    ) -> None:
        self.plan, self.adapter, self.cache = plan, adapter, cache
        n_layers, n_kv, k = context_index.shape
        extra = torch.arange(L, L + held - k).expand(n_layers, n_kv, held - k)
        self.index = torch.cat([context_index.cpu(), extra], dim=-1)  # sequence index per slot
        self.fed = L + held - k  # tokens fed so far (sequence indices in use)
        self.rows: list[list[torch.Tensor]] = [[] for _ in range(adapter.n_layers)]
        self.positions: list[int] = []
        self.steps = 0
        self.compressions = 0
        self.seconds = 0.0

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Capture every layer's attention input during one forward pass."""
        handles = [
            self.adapter.query_projection(i).register_forward_pre_hook(self._capture(i))
            for i in range(self.adapter.n_layers)
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _capture(self, layer: int):
        def pre_hook(module, args):
            self.rows[layer].append(args[0].detach())

        return pre_hook

    def after_forward(self, n: int, position: int, generated: bool) -> None:
        """Account for ``n`` tokens just fed at ``position``..; compress when an interval ends."""
        if not generated:  # the question: its slots join the cache, nothing is observed
            new = torch.arange(self.fed, self.fed + n)
            self.index = torch.cat([self.index, new.expand(*self.index.shape[:2], n)], dim=-1)
            self.fed += n
            return
        self.positions.extend(range(position, position + n))
        self.fed += n
        if len(self.positions) >= self.plan.interval:
            self._step()

    def _step(self) -> None:
        n = len(self.positions)
        ly, h, _ = self.index.shape
        new = torch.arange(self.fed - n, self.fed).expand(ly, h, n)
        index = torch.cat([self.index, new], dim=-1)
        held = self.adapter.cache_length(self.cache)
        rows, self.rows = self.rows, [[] for _ in range(self.adapter.n_layers)]
        positions, self.positions = self.positions, []
        if held <= self.plan.budget:
            self.index = index
            return
        device = self.adapter.layer_kv(self.cache, 0)[0].device
        t0 = time.perf_counter()
        layout = StepLayout(
            context_length=self.fed,
            block_index=self.steps,
            n_blocks=self.steps + 1,
            block_start=self.fed - n,
            block_end=self.fed,
            n_past=held - n,
            n_question=0,
            context_index=index,
        )
        comp = self.plan.composition
        pos = torch.tensor(positions, device=device)
        allocation, evicts, observer = plan_step(self.adapter, self.cache, comp, layout, n, pos)
        if observer.scorers:
            for layer in range(self.adapter.n_layers):
                observer.observe_layer(layer, torch.cat(rows[layer], dim=1))
        outcome = compress_step(
            self.adapter,
            comp,
            self.cache,
            layout,
            allocation,
            evicts,
            observer.observed,
            last_logits=torch.empty(0),
            last=False,
            ragged=_RAGGED_REFUSAL,
        )
        self.index = outcome.context_index
        self.steps += 1
        self.compressions += int(evicts)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.seconds += time.perf_counter() - t0
