"""The ``exact`` scorer: LASER-KV's global attention consensus.

LASER-KV (Sood, Sharma, Agrawal, arXiv 2602.02199) scores every key ``j`` by the attention all
question tokens pay it, summed over every layer and every query head::

    s_j = sum_layers sum_query_heads sum_question_tokens softmax(q . K / sqrt(d))_j

with the softmax over every key the question token can see (past + block + earlier question
tokens, causal), accumulated in float32. Queries are recomputed from each layer's input (q_proj,
q_norm where present, RoPE at the question's positions) by
:meth:`~kvpress_lab.interfaces.LayerObservation.attention`, so the model can run under SDPA or
FlashAttention; the weights are formed in memory-bounded blocks
(:meth:`~kvpress_lab.interfaces.LayerObservation.attention_blocks`) and GQA keys are broadcast,
never copied. The score is one global vector: selection is shared by every layer and
every KV head. When the question is not visible (query-agnostic protocol) the block's trailing
observation window stands in for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import attrs
import torch

from kvpress_lab.hookspecs import hookimpl
from kvpress_lab.interfaces import LayerObservation, Scorer, StepLayout

__all__ = ["ExactScorer"]


@attrs.define(kw_only=True)
class ExactScorer(Scorer):
    """Attention mass from the question rows, summed over layers, heads and rows: [1, 1, N]."""

    name: ClassVar[str] = "exact"

    def observe(self, obs: LayerObservation) -> torch.Tensor:
        _, h, n, _ = obs.keys.shape
        out = None
        # memory-bounded blocks of [B, H_kv, G, r, N] float32 weights, summed into [H_kv, N]
        for blk in obs.attention_blocks(obs.observation_rows()):
            part = blk.weights.sum(dim=(0, 2, 3))
            if blk.complete:
                return part
            if out is None:
                out = part.new_zeros(h, n)
            out[blk.heads, blk.keys] += part
        return out if out is not None else torch.zeros(h, n, device=obs.keys.device)

    def score(
        self,
        layout: StepLayout,
        observed: Sequence[torch.Tensor | None],
        candidates: torch.Tensor,
        cache_keys: Callable[[int], torch.Tensor],
    ) -> torch.Tensor:
        per_layer = [o for o in observed if o is not None]
        if not per_layer:
            raise RuntimeError("exact scorer: no layer was observed during the forward pass")
        total = per_layer[0].sum(dim=0)
        for o in per_layer[1:]:
            total = total + o.sum(dim=0).to(total.device)
        return total.view(1, 1, -1)


@hookimpl
def kvlab_scorers() -> list[type]:
    return [ExactScorer]
