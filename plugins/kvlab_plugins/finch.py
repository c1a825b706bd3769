"""FINCH: prompt-guided chunked compression with re-rotated keys.

Corallo & Papotti, "FINCH: Prompt-guided Key-Value Cache Compression for Large Language Models",
TACL 2024 (official code: giulio98/context-compression). The context is read in chunks of
``block_size`` tokens, each followed by the question. The question rows' attention to the cache
and the chunk, summed over the layer's heads and over the question rows, scores every context slot;
one index set per LAYER (shared by its heads) keeps the best among the old survivors and the new
chunk together. The question's KV is discarded after every chunk and the kept keys are re-rotated
to contiguous positions, so the next chunk and finally the question continue right after them.

Normalisation: each question row is multiplied by ``(its position + 1) / N`` (``N`` keys visible
to the last row), the paper's correction for the number of non-zero entries of a causal row. The
official Llama code overwrites this correction by mistake; it is applied here.

Budget (a documented deviation): the paper keeps ``chunk_len // sigma + cache size`` after every
chunk with ``sigma = ceil(L / target)``; the floors can end far from the target (e.g. L=1000,
target 300: sigma 4, 250 kept). Here, after the chunk ending at context position ``e``, the cache
keeps ``round(target * e / L)`` tokens (at least 1), which equals the paper's rule whenever the
divisions are exact and ends at exactly ``target = floor(keep_ratio * L)`` tokens, as the
project's fairness rule requires. The cache never exceeds the target during prefill.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import ClassVar

import attrs
import torch

from kvlab_plugins.topk import TopKSelector
from kvpress_lab.hookspecs import hookimpl
from kvpress_lab.interfaces import Allocation, Budgeter, LayerObservation, Scorer, StepLayout
from kvpress_lab.policy import Composition, EngineOptions, Policy, budget_tokens
from kvpress_lab.validators import check_keep_ratio, positive_int


def finch_layer_scores(
    attn: torch.Tensor, row_positions: torch.Tensor, n_keys: int | None = None
) -> torch.Tensor:
    """FINCH scores of one layer (or of one block of its rows and heads): [n] float32.

    Args:
        attn: [B, H, G, r, n] softmax attention of question rows over the first ``n`` keys.
        row_positions: [r] positions of those rows (contiguous mode: their slot indices).
        n_keys: keys visible to the last question row (the ``N`` of the normalisation);
            defaults to ``n``, the whole layer.
    """
    n = attn.shape[-1] if n_keys is None else n_keys
    weight = (row_positions.to(torch.float32) + 1.0) / n  # [r]
    return (attn.float() * weight.to(attn.device)[:, None]).sum(dim=(0, 1, 2, 3))


@attrs.define(kw_only=True)
class FinchScorer(Scorer):
    """Position-normalised question attention, summed over heads: one score row per layer."""

    name: ClassVar[str] = "finch"

    def observe(self, obs: LayerObservation) -> torch.Tensor:
        rows = obs.observation_rows()  # the question (query-agnostic: trailing window)
        n = obs.keys.shape[2]
        out = torch.zeros(1, n, device=obs.keys.device)
        # memory-bounded blocks of the question's attention, summed over heads and rows
        for blk in obs.attention_blocks(rows):
            positions = obs.n_past + torch.arange(
                blk.rows.start, blk.rows.stop, device=blk.weights.device
            )
            part = finch_layer_scores(blk.weights, positions, n_keys=n)
            if blk.complete:
                return part[None]  # [1, N]
            out[0, blk.keys] += part
        return out

    def score(
        self,
        layout: StepLayout,
        observed: Sequence[torch.Tensor | None],
        candidates: torch.Tensor,
        cache_keys: Callable[[int], torch.Tensor],
    ) -> torch.Tensor:
        return torch.stack(list(observed))  # [Ly, 1, N], on the model's device


def finch_keep_after(target: int, block_end: int, context_length: int) -> int:
    """Tokens kept after the chunk ending at ``block_end``: round(target * block_end / L), >= 1."""
    return max(1, math.floor(target * block_end / context_length + 0.5))


@attrs.define(kw_only=True)
class FinchChunkBudgeter(Budgeter):
    """Every context slot (old survivors and the new chunk) is a candidate; the cache grows in
    proportion to the context read, ``round(target * processed / L)``, reaching the target at the
    end."""

    name: ClassVar[str] = "finch_chunk"
    keep_ratio: float | None = attrs.field(default=1.0, validator=check_keep_ratio)
    budget: int | None = attrs.field(default=None, validator=positive_int)

    def target_tokens(self, context_length: int) -> int:
        return budget_tokens(context_length, self.keep_ratio, self.budget)

    def allocate(self, layout: StepLayout) -> Allocation:
        ctx = ~layout.question_mask[:1, :1]
        n_ctx = int(ctx.sum())
        target = self.target_tokens(layout.context_length)
        keep = min(n_ctx, finch_keep_after(target, layout.block_end, layout.context_length))
        if keep >= n_ctx:
            return Allocation.keep_all(layout)
        return Allocation(protected=torch.zeros_like(ctx), candidates=ctx, k=keep)


@attrs.define(kw_only=True)
class FinchPolicy(Policy):
    """FINCH: chunked prefill, per-layer selection, keys re-rotated after every chunk."""

    name: ClassVar[str] = "finch"
    block_size: int = attrs.field(default=512, validator=positive_int)

    def compose(self) -> Composition:
        return Composition(
            budgeter=self.build(FinchChunkBudgeter),
            scorers={"main": FinchScorer()},
            selector=TopKSelector(scorer="main", granularity="layer"),
            engine=EngineOptions(block_size=self.block_size, position_mode="contiguous"),
        )


@hookimpl
def kvlab_scorers() -> list[type]:
    return [FinchScorer]


@hookimpl
def kvlab_budgeters() -> list[type]:
    return [FinchChunkBudgeter]


@hookimpl
def kvlab_policies() -> list[type]:
    return [FinchPolicy]
