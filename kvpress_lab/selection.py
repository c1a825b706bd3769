"""Helpers shared by selectors: score aggregation by granularity and masked top-k."""

from __future__ import annotations

from typing import Literal

import torch

from kvpress_lab.errors import PluginError

__all__ = ["Granularity", "reduce_scores", "topk_candidates"]

Granularity = Literal["global", "layer", "head"]


def reduce_scores(scores: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """Sum [Ly|1, H|1, N] scores down to one set for the model, per layer, or keep per head."""
    scores = scores.float()
    if granularity == "global":
        return scores.sum(dim=(0, 1), keepdim=True)
    if granularity == "layer":
        return scores.sum(dim=1, keepdim=True)
    return scores


def topk_candidates(scores: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` best candidates per row, sorted ascending.

    ``scores`` [Ly', H', N]; ``candidates`` a bool mask broadcastable to it. Rows of ``scores``
    with a leading dim of 1 must have candidates that are the same for every layer/head.
    """
    cand = candidates.to(torch.bool)
    lead = torch.broadcast_shapes(scores.shape[:2], cand.shape[:2])
    if lead != scores.shape[:2]:
        # one score row must serve several candidate rows: only possible if they agree
        if not bool((cand == cand[:1, :1]).all()):
            raise PluginError(
                "candidates differ between layers/heads but the selection granularity gives one "
                "index set for them; use a finer granularity"
            )
        cand = cand[:1, :1]
    cand = cand.expand(*scores.shape[:2], scores.shape[-1])
    if k == 0:
        return torch.empty(*scores.shape[:2], 0, dtype=torch.long, device=scores.device)
    masked = scores.masked_fill(~cand.to(scores.device), float("-inf"))
    idx = masked.topk(k, dim=-1).indices
    return idx.sort(dim=-1).values  # on the scores' device: no host transfer
