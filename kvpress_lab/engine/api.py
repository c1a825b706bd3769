"""The few-lines Python entry point: ``run(model, policy, context, question)``."""

from __future__ import annotations

import time

import torch

from kvpress_lab.adapters import adapter_for
from kvpress_lab.engine.decode import greedy_decode, stop_token_ids
from kvpress_lab.engine.generation import DecodeRecord, plan_generation
from kvpress_lab.engine.result import RunResult
from kvpress_lab.engine.runner import (
    CompressedContext,
    check_fits,
    check_supported,
    prefill_and_compress,
)
from kvpress_lab.errors import ConfigError
from kvpress_lab.models import LoadedModel
from kvpress_lab.policy import Composition, Policy
from kvpress_lab.prompt import PromptSegments, build_prompt
from kvpress_lab.spec import load_policy

__all__ = ["answer_compressed", "run", "run_segments"]


def run(
    lm: LoadedModel,
    policy: str | Policy,
    context: str,
    question: str,
    answer_prefix: str = "",
    *,
    query_agnostic: bool = False,
    max_new_tokens: int = 32,
    chat_template: bool = True,
) -> RunResult:
    """Compress ``context`` with ``policy`` and answer ``question`` from the compressed cache.

    >>> lm = load_model()                                   # doctest: +SKIP
    >>> run(lm, "snapkv:keep_ratio=0.25", text, "Who?").answer  # doctest: +SKIP
    """
    pol = load_policy(policy)
    segments = build_prompt(lm.tokenizer, context, question, answer_prefix, chat_template)
    return run_segments(
        lm, pol, segments, query_agnostic=query_agnostic, max_new_tokens=max_new_tokens
    )


def run_segments(
    lm: LoadedModel,
    policy: Policy,
    segments: PromptSegments,
    *,
    query_agnostic: bool = False,
    max_new_tokens: int = 32,
) -> RunResult:
    """:func:`run` on already tokenized context and question segments."""
    check_fits(lm, segments, max_new_tokens)
    comp = policy.compose()
    check_supported(
        adapter_for(lm.model),
        comp,
        segments,
        max_new_tokens,
        query_agnostic,
        policy_name=policy.name,
        decode_compression=policy.decode_interval is not None,
    )
    plan_generation(policy, comp, segments.context_length, segments.question_length)
    state = prefill_and_compress(
        lm, comp, segments, query_agnostic=query_agnostic, policy_name=policy.name
    )
    return answer_compressed(
        lm,
        policy,
        comp,
        segments,
        state,
        query_agnostic=query_agnostic,
        max_new_tokens=max_new_tokens,
    )


def answer_compressed(
    lm: LoadedModel,
    policy: Policy,
    comp: Composition,
    segments: PromptSegments,
    state: CompressedContext,
    *,
    query_agnostic: bool,
    max_new_tokens: int,
) -> RunResult:
    """Answer the question over an already compressed context and collect the result."""
    adapter = adapter_for(lm.model)
    held = adapter.cache_length(state.cache)
    if state.kept_counts is None:
        per_token = adapter.kv_bytes(state.cache) / max(1, held)
    else:  # a ragged cache: bytes of one slot in every layer and KV head, from the storages
        slots = int(state.kept_counts.sum())
        per_token = adapter.kv_bytes(state.cache) * state.kept_counts.numel() / max(1, slots)
    kept_bytes = int(round(per_token * state.kept_tokens))

    plan = plan_generation(policy, comp, segments.context_length, segments.question_length)
    if state.kept_counts is not None and (plan is not None or comp.decode_evictor is not None):
        raise ConfigError(
            f"{policy.name}: the compressed cache is ragged (layers/KV heads keep "
            f"{int(state.kept_counts.min())} to {int(state.kept_counts.max())} tokens), and "
            "generation-time compression or decode-time eviction needs a dense cache; drop "
            "decode_interval/decode_budget (or decode eviction) or use an equal-count budgeter"
        )
    compressor = (
        plan.start(adapter, state.cache, state.context_index, held, state.context_length)
        if plan is not None
        else None
    )
    record = DecodeRecord(peak_kv_tokens=held)

    if lm.device.type == "cuda":
        torch.cuda.synchronize(lm.device)
    t0 = time.perf_counter()
    evictor = comp.decode_evictor.start(lm, state) if comp.decode_evictor is not None else None
    try:
        answer_ids = greedy_decode(
            adapter,
            state.cache,
            segments.question_ids,
            state.next_position,
            max_new_tokens,
            stop_token_ids(lm.model, lm.tokenizer),
            first_logits=state.question_logits,
            eviction=evictor,
            compressor=compressor,
            record=record,
        )
    finally:
        # evictors may hold resources for the answer: release them
        close = getattr(evictor, "close", None)
        if close is not None:
            close()
    if lm.device.type == "cuda":
        torch.cuda.synchronize(lm.device)
    decode_s = time.perf_counter() - t0
    answer = lm.tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
    return RunResult(
        answer=answer,
        answer_token_ids=answer_ids,
        policy_name=policy.name,
        policy_params=policy.params(),
        model=lm.name,
        protocol="query-agnostic" if query_agnostic else "question-aware",
        context_token_ids=segments.context_ids.tolist(),
        question_token_ids=segments.question_ids.tolist(),
        kept_indices=state.context_index.cpu(),
        kept_counts=state.kept_counts,
        kv_bytes_full=int(round(per_token * state.context_length)),
        kv_bytes_kept=kept_bytes,
        peak_kv_tokens=state.peak_kv_tokens,
        peak_kv_bytes=state.peak_kv_bytes,
        prefill_s=state.prefill_s,
        compress_s=state.compress_s,
        decode_s=decode_s,
        blocks=state.blocks,
        target_tokens=comp.budgeter.target_tokens(state.context_length),
        decode_compressions=compressor.compressions if compressor is not None else 0,
        decode_peak_kv_tokens=record.peak_kv_tokens,
        probe_s=state.probe_s,
    )
