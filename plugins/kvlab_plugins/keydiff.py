"""KeyDiff: keep the keys least similar to the layer's mean key direction.

Park et al., "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference in
Resource-Constrained Environments", 2025
(arXiv:2504.15364). Keys that point away from the average key direction are the distinctive ones
and are kept. Per layer and KV head, the anchor is the mean of the L2-normalised context keys,
``a = mean_j k_j / ||k_j||``, and slot ``j`` scores ``-cos(k_j, a)``; each KV head keeps its own
best-scored context tokens, nothing protected.

This is NVIDIA kvpress's ``KeyDiffPress`` (one-shot after prefill). The paper evicts block by
block during prefill (kvpress: ``BlockPress(KeyDiffPress(...))``); that variant is not offered
here. Deliberate difference: the anchor averages the *context* slots only, so the question's keys
(visible in the default question-aware protocol) do not move it; under the query-agnostic protocol
that is exactly kvpress's anchor, and ``keydiff:keep_ratio=r`` keeps, per layer and KV head, the
positions ``KeyDiffPress(compression_ratio=1 - r)`` keeps (a differential test checks this on the
default model).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import attrs
import torch
import torch.nn.functional as F

from kvlab_plugins.sink_window import SinkWindowBudgeter
from kvlab_plugins.topk import TopKSelector
from kvpress_lab.hookspecs import hookimpl
from kvpress_lab.interfaces import Scorer, StepLayout
from kvpress_lab.policy import Composition, Policy


def keydiff_scores(keys: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """``keys`` [H, N, D], ``context`` bool [H, N] (the slots that form the anchor) -> [H, N].

    ``-cosine(k_j, mean of the normalised context keys)`` for every slot, float32 at least.
    """
    keys = keys.to(torch.promote_types(keys.dtype, torch.float32))
    out = []
    for h in range(keys.shape[0]):
        anchor = F.normalize(keys[h, context[h]], p=2, dim=-1).mean(dim=0, keepdim=True)
        out.append(-F.cosine_similarity(keys[h], anchor, dim=-1))
    return torch.stack(out)


@attrs.define(kw_only=True)
class KeyDiffScorer(Scorer):
    """Negative cosine similarity of every key with its head's normalised mean context key."""

    name: ClassVar[str] = "keydiff"
    layer_local: ClassVar[bool] = True  # a layer's scores read only that layer

    def score(
        self,
        layout: StepLayout,
        observed: Sequence[torch.Tensor | None],
        candidates: torch.Tensor,
        cache_keys: Callable[[int], torch.Tensor],
    ) -> torch.Tensor:
        device = cache_keys(0).device  # scores stay on the model's device (no host copy)
        context = (~layout.question_mask).to(device)  # [Ly, H, N]
        layers = context.shape[0]
        return torch.stack(
            [
                keydiff_scores(cache_keys(i)[0], context[i].to(cache_keys(i).device)).to(device)
                for i in range(layers)
            ]
        )


@attrs.define(kw_only=True)
class KeyDiffPolicy(Policy):
    """KeyDiff, one-shot after prefill, per KV head, original positions."""

    name: ClassVar[str] = "keydiff"

    def compose(self) -> Composition:
        return Composition(
            budgeter=self.build(SinkWindowBudgeter),
            scorers={"main": KeyDiffScorer()},
            selector=TopKSelector(scorer="main", granularity="head"),
        )


@hookimpl
def kvlab_scorers() -> list[type]:
    return [KeyDiffScorer]


@hookimpl
def kvlab_policies() -> list[type]:
    return [KeyDiffPolicy]
