"""Compress once, answer many: several questions over one compressed context.

Under the query-agnostic protocol the compression never sees the question, so the compressed
cache of a context is the same whichever question follows. :func:`answer_questions` runs the
policy's prefill and compression once (:func:`~kvpress_lab.engine.runner.prefill_and_compress`)
and answers every question from its own copy of that cache (the adapter's ``copy_cache``: new
layer objects over the same tensors; decoding appends new tensors, it never writes into the
shared ones), so each answer is the one a separate single-question run would give. This is the
protocol of KVzip (Kim et al. 2025, "KVzip: Query-Agnostic KV Cache Compression with Context
Reconstruction") and of SCBench's multi-turn evaluation (Li et al. 2025, "SCBench: A KV
Cache-Centric Analysis of Long-Context Methods"): one compressed context serves many queries.

Under the question-aware protocol the question is part of the prefill, so every question needs
its own prefill: that is :func:`~kvpress_lab.engine.api.run_segments` once per question.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch

from kvpress_lab.adapters import adapter_for
from kvpress_lab.engine.api import answer_compressed
from kvpress_lab.engine.result import RunResult
from kvpress_lab.engine.runner import check_fits, check_supported, prefill_and_compress
from kvpress_lab.errors import InputError
from kvpress_lab.models import LoadedModel
from kvpress_lab.policy import Policy
from kvpress_lab.prompt import PromptSegments

__all__ = ["Answers", "answer_questions"]


@attrs.frozen
class Answers:
    """The answers to several questions over one context, and the prefills they cost.

    ``prefills`` counts the calls of the engine's prefill-and-compress made for these answers
    (1: the context was prefilled and compressed once, whatever the number of questions).
    """

    results: tuple[RunResult, ...]
    prefills: int


def _check_one_context(questions: Sequence[PromptSegments]) -> None:
    if not questions:
        raise InputError("answer_questions needs at least one question segment")
    first = questions[0].context_ids
    for i, seg in enumerate(questions[1:], start=1):
        if not torch.equal(seg.context_ids, first):
            raise InputError(
                f"question {i}'s prompt has another context segment than question 0's "
                f"({seg.context_length} vs {questions[0].context_length} tokens); the questions "
                "of one call must share one context: build every prompt from the same context"
            )


@torch.no_grad()
def answer_questions(
    lm: LoadedModel,
    policy: Policy,
    questions: Sequence[PromptSegments],
    *,
    max_new_tokens: int = 32,
) -> Answers:
    """Compress the shared context once, without any question, and answer every question.

    ``questions`` are the prompts (context + question segments) of each question; their context
    segments must be identical. The answer to each equals
    ``run_segments(lm, policy, segments, query_agnostic=True)`` run on its own.
    """
    _check_one_context(questions)
    for segments in questions:
        check_fits(lm, segments, max_new_tokens)
    comp = policy.compose()
    adapter = adapter_for(lm.model)
    for segments in questions:
        check_supported(
            adapter,
            comp,
            segments,
            max_new_tokens,
            True,
            policy_name=policy.name,
            decode_compression=policy.decode_interval is not None,
        )
    prefills = 0
    state = prefill_and_compress(
        lm, comp, questions[0], query_agnostic=True, policy_name=policy.name
    )
    prefills += 1
    results = []
    for i, segments in enumerate(questions):
        last = i == len(questions) - 1
        # the last question may use the cache itself: no later answer needs it untouched
        own = state if last else attrs.evolve(state, cache=adapter.copy_cache(state.cache))
        results.append(
            answer_compressed(
                lm,
                policy,
                comp,
                segments,
                own,
                query_agnostic=True,
                max_new_tokens=max_new_tokens,
            )
        )
    return Answers(tuple(results), prefills)
