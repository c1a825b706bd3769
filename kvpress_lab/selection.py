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


def topk_candidates(
    scores: torch.Tensor, candidates: torch.Tensor, k: int | torch.Tensor
) -> torch.Tensor:
    """The ``k`` best candidates per row: indices for an int ``k``, a bool mask for a tensor.

    ``scores`` [Ly', H', N]; ``candidates`` a bool mask broadcastable to it. Rows of ``scores``
    with a leading dim of 1 must have candidates that are the same for every layer/head.

    An int ``k`` gives long indices ``[Ly', H', k]`` sorted ascending. A long ``[Ly|1, H|1]``
    tensor ``k`` of per-layer / per-head counts (an allocation's, see
    :class:`~kvpress_lab.interfaces.Allocation`) gives the bool mask
    ``[broadcast(Ly', Ly|1), broadcast(H', H|1), N]`` with each row's ``k`` best candidates set.
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
    if isinstance(k, torch.Tensor):
        return _topk_mask(scores, cand, k)
    if k == 0:
        return torch.empty(*scores.shape[:2], 0, dtype=torch.long, device=scores.device)
    masked = scores.masked_fill(~cand.to(scores.device), float("-inf"))
    idx = masked.topk(k, dim=-1).indices
    return idx.sort(dim=-1).values  # on the scores' device: no host transfer


def _topk_mask(scores: torch.Tensor, cand: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Bool mask of each row's ``k[row]`` best candidates (``k`` broadcast against the rows)."""
    if k.dim() != 2:
        raise PluginError(
            f"per-row counts k of shape {tuple(k.shape)}; expected [layers or 1, KV heads or 1]"
        )
    n = scores.shape[-1]
    lead = torch.broadcast_shapes(scores.shape[:2], tuple(k.shape))
    counts = k.to(device=scores.device, dtype=torch.long).expand(lead)
    # k lives on the host (the allocation's): its largest value sizes one top-k for every row
    k_max = int(k.max()) if k.numel() else 0
    if k_max == 0:
        return torch.zeros(*lead, n, dtype=torch.bool, device=scores.device)
    masked = scores.masked_fill(~cand.to(scores.device), float("-inf")).expand(*lead, n)
    order = masked.topk(k_max, dim=-1).indices  # best first
    take = torch.arange(k_max, device=scores.device) < counts[..., None]
    mask = torch.zeros(*lead, n, dtype=torch.bool, device=scores.device)
    return mask.scatter_(-1, order, take)
