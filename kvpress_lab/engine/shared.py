"""One prefill, many policies: shared prefill for side-by-side comparisons.

Policies that compress in a single step (``EngineOptions.block_size`` is None, or a block at least
as long as the context, which the engine runs as one block too) all start from the same forward
pass over ``context + question``: the positions, the cache and the model outputs do not depend on
the policy. :func:`run_shared` runs that forward pass once with every policy's scorers observing
it (one :class:`~kvpress_lab.engine.observe.Observer` per policy, all attached at once), then, per
policy, takes a shallow copy of the cache, performs that policy's compression step with the
engine's own :func:`~kvpress_lab.engine.runner.compress_step` and answers. The result is the same
as an independent :func:`~kvpress_lab.engine.api.run_segments` per policy (kept indices and
answer), at the cost of one prefill instead of one per policy.

Layer-wise compression (:func:`~kvpress_lab.engine.runner.compresses_layerwise`) does not apply
here, by design: every policy compresses its own copy of the one full cache, so that cache is held
in full until the last policy has compressed. Each record's ``peak_kv_bytes`` is the measured size
of that shared cache (or more, for a probe pass), which for a layer-local policy is higher than
the peak of an independent run of it; run the policy alone (``kvlab run``) to measure its own
layer-wise peak.

Policies whose scorers have equal settings (the same policy at several keep ratios) share one
observer and one run of their probe passes (KVzip's): the observations do not depend on the
budget, so they are computed once and each policy selects from them with its own budget.

Timing: every result carries the *shared* prefill time (the forward pass minus the time spent in
all policies' scorers); ``compress_s`` is the policy's own scorer time (the shared observer's and
probe passes' time, which a run of that policy alone would spend) plus its selection and
gather.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence

import torch

from kvpress_lab.adapters import adapter_for
from kvpress_lab.engine.api import answer_compressed
from kvpress_lab.engine.observe import Observer
from kvpress_lab.engine.result import RunResult
from kvpress_lab.engine.runner import (
    CompressedContext,
    ProbeInputs,
    _sync,
    check_fits,
    check_supported,
    compress_step,
    plan_step,
)
from kvpress_lab.interfaces import StepLayout
from kvpress_lab.models import LoadedModel
from kvpress_lab.policy import Composition, Policy
from kvpress_lab.prompt import PromptSegments

__all__ = ["can_share_prefill", "run_shared"]


def can_share_prefill(comp: Composition, context_length: int) -> bool:
    """Whether the policy compresses ``context_length`` tokens in one step (one block)."""
    block = comp.engine.block_size
    return block is None or block >= context_length


@torch.no_grad()
def run_shared(
    lm: LoadedModel,
    policies: Sequence[Policy],
    segments: PromptSegments,
    *,
    query_agnostic: bool = False,
    max_new_tokens: int = 32,
) -> Iterator[RunResult]:
    """Run ``policies`` over one shared prefill; yields one :class:`RunResult` per policy, in order.

    Every policy must satisfy :func:`can_share_prefill`. Results are yielded as soon as each
    policy has answered, so a caller can store them one by one.
    """
    check_fits(lm, segments, max_new_tokens)
    model, device = lm.model, lm.device
    adapter = adapter_for(model)
    comps = [p.compose() for p in policies]
    L = segments.context_length
    for pol, comp in zip(policies, comps, strict=True):
        comp.budgeter.validate(L)
        check_supported(
            adapter,
            comp,
            segments,
            max_new_tokens,
            query_agnostic,
            policy_name=pol.name,
            decode_compression=pol.decode_interval is not None,
        )
        if not can_share_prefill(comp, L):
            raise ValueError(
                f"policy {pol.name!r} runs block-wise (block_size={comp.engine.block_size}) "
                f"over {L} tokens and cannot share a one-shot prefill"
            )
    ctx = segments.context_ids.to(device)
    question = segments.question_ids.to(device)
    Q = 0 if query_agnostic else int(question.numel())
    n_layers, n_kv = adapter.n_layers, adapter.n_kv_heads
    ids = torch.cat([ctx, question[:Q]])
    n_in = int(ids.numel())
    # one block starting at 0: "original" and "contiguous" positions coincide (0 .. L+Q-1)
    positions = torch.arange(0, n_in, device=device)
    step_index = torch.cat([torch.arange(L), torch.full((Q,), -1)]).expand(n_layers, n_kv, -1)
    layout = StepLayout(
        context_length=L,
        block_index=0,
        n_blocks=1,
        block_start=0,
        block_end=L,
        n_past=0,
        n_question=Q,
        context_index=step_index,
    )
    cache = adapter.new_cache()
    plans = [plan_step(adapter, cache, comp, layout, n_in, positions) for comp in comps]
    # policies that differ only in their budget (one policy at several keep ratios) observe with
    # scorers of equal settings: one observer serves them all, and their probe passes run once
    firsts: dict[str, Observer] = {}
    sources = [firsts.setdefault(observer.signature(), observer) for _, _, observer in plans]
    _sync(device)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        for observer in firsts.values():
            stack.enter_context(observer.attached())
        logits = adapter.forward(ids, cache, positions, torch.arange(0, n_in, device=device))
    _sync(device)
    t1 = time.perf_counter()
    prefill_s = (t1 - t0) - sum(obs.seconds for obs in firsts.values())
    probed: dict = {}  # probe passes run once per distinct scorer settings
    peak_bytes = adapter.kv_bytes(cache)
    last_logits = logits[-1]

    for i, (policy, comp, (allocation, evicts, _), observer) in enumerate(
        zip(policies, comps, plans, sources, strict=True)
    ):
        # the engine never writes into cached tensors, only assigns new ones: sharing is safe
        own = cache if i == len(comps) - 1 else adapter.copy_cache(cache)
        t2 = time.perf_counter()
        probe_inputs = ProbeInputs(context_ids=ctx, tokenizer=lm.tokenizer)
        outcome = compress_step(
            adapter,
            comp,
            own,
            layout,
            allocation,
            evicts,
            observer.observed,
            last_logits,
            last=True,
            probe_inputs=probe_inputs,
            probed=probed,
        )
        context_index, question_logits = outcome.context_index, outcome.question_logits
        _sync(device)
        compress_s = observer.seconds + (time.perf_counter() - t2)
        contiguous = comp.engine.position_mode == "contiguous"
        state = CompressedContext(
            cache=outcome.cache,
            held_tokens=int(context_index.shape[-1]),
            context_index=context_index[
                ..., : context_index.shape[-1] - (Q if question_logits is not None else 0)
            ],
            next_position=int(context_index.shape[-1]) if contiguous else L,
            context_length=L,
            peak_kv_tokens=max(n_in, probe_inputs.peak_tokens),
            peak_kv_bytes=max(peak_bytes, probe_inputs.peak_bytes),
            prefill_s=prefill_s,
            compress_s=compress_s,
            blocks=1,
            question_logits=question_logits,
            probe_s=probe_inputs.seconds,
            kept_counts=outcome.counts,
        )
        yield answer_compressed(
            lm,
            policy,
            comp,
            segments,
            state,
            query_agnostic=query_agnostic,
            max_new_tokens=max_new_tokens,
        )
