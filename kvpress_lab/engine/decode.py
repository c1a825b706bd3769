"""Greedy decoding over a (compressed) cache with explicit positions."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from kvpress_lab.adapters import ModelAdapter
from kvpress_lab.engine.generation import DecodeRecord, GenerationCompressor
from kvpress_lab.engine.observe import Observer
from kvpress_lab.interfaces import KVCacheView

__all__ = ["greedy_decode", "stop_token_ids"]


def stop_token_ids(model, tokenizer) -> set[int]:
    """End-of-turn tokens: the generation config's EOS ids plus the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, Iterable):
            ids.update(int(e) for e in eos)
    return ids


class _Stepper:
    """One forward pass at a time over the cache; runs the evictor's scorer and eviction, and
    generation-time compression.

    The per-token path does no more host work than ``model.generate``'s: positions and slots are
    slices of two index tensors built once (``span`` tokens fed at most), and an
    :class:`~kvpress_lab.engine.observe.Observer` is built only when the evictor has a scorer
    that observes the pass.
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        cache,
        eviction,
        compressor: GenerationCompressor | None,
        record: DecodeRecord | None,
        start_position: int,
        span: int,
    ) -> None:
        self.adapter, self.cache, self.eviction = adapter, cache, eviction
        self.compressor = compressor
        self.record = record if record is not None else DecodeRecord()
        device = next(adapter.model.parameters()).device
        self.view = KVCacheView(adapter, cache)
        scorer = getattr(eviction, "scorer", None)
        self.scorers = [("evict", scorer)] if scorer is not None else []
        self.observes = any(s.needs_observation for _, s in self.scorers)
        self.start = start_position
        # eviction and compression only shrink the cache, so no slot exceeds held + span
        held = adapter.cache_length(cache)
        self.positions = torch.arange(start_position, start_position + span, device=device)
        self.slots = torch.arange(held + span, device=device)

    def __call__(self, ids: torch.Tensor, position: int, generated: bool = False) -> torch.Tensor:
        n = int(ids.numel())
        slot = self.adapter.cache_length(self.cache)
        offset = position - self.start
        positions = self.positions[offset : offset + n]
        slots = self.slots[slot : slot + n]
        observer = None
        if self.scorers:
            observer = Observer(
                self.adapter,
                self.cache,
                self.scorers,
                layout=None,
                positions=positions,
                question_rows=None,
                observation_window=n,
            )
        attached = observer.attached() if self.observes else contextlib.nullcontext()
        recording = (
            self.compressor.recording()
            if self.compressor is not None and generated
            else contextlib.nullcontext()
        )
        with attached, recording:
            logits = self.adapter.forward(ids, self.cache, positions, slots)
        self.record.peak_kv_tokens = max(self.record.peak_kv_tokens, slot + n)
        if self.eviction is not None:
            observed = observer.observed.get("evict") if observer is not None else None
            self.eviction.after_forward(self.view, observed)
        if self.compressor is not None:
            self.compressor.after_forward(n, position, generated)
        return logits[-1]


@torch.no_grad()
def greedy_decode(
    adapter: ModelAdapter,
    cache,
    prompt_ids: torch.Tensor | None,
    start_position: int,
    max_new_tokens: int,
    stop_ids: set[int],
    first_logits: torch.Tensor | None = None,
    eviction=None,
    compressor: GenerationCompressor | None = None,
    record: DecodeRecord | None = None,
) -> list[int]:
    """Feed ``prompt_ids`` (the question) at ``start_position``.., then decode greedily.

    When ``first_logits`` is given the prompt was already fed (its KV is in the cache) and
    decoding starts from those logits. ``eviction``, if given, is a decode-time policy (H2O's):
    its optional ``scorer`` observes every forward pass and ``after_forward(view, observed)``
    evicts through a :class:`~kvpress_lab.interfaces.KVCacheView` to keep the cache at budget.
    ``compressor``, if given, compresses the cache every few generated tokens
    (:mod:`kvpress_lab.engine.generation`). ``record``, if given, receives the most slots held
    after any forward pass.
    """
    span = int(prompt_ids.numel()) + max_new_tokens  # positions the answer can reach
    step = _Stepper(adapter, cache, eviction, compressor, record, start_position, span)
    position = start_position
    if first_logits is None:
        logits = step(prompt_ids.to(step.positions.device), position)
    else:  # the question is already in the cache
        logits = first_logits
    position += int(prompt_ids.numel())
    generated: list[int] = []
    for _ in range(max_new_tokens):
        next_id = torch.argmax(logits).reshape(1)  # stays on the model's device
        token = int(next_id)
        if token in stop_ids:
            break
        generated.append(token)
        if len(generated) == max_new_tokens:
            break
        logits = step(next_id, position, generated=True)
        position += 1
    return generated
