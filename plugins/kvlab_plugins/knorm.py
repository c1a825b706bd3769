"""Knorm: keep the keys with the smallest L2 norm.

Devoto, Zhao, Scardapane and Minervini, "A Simple and Effective L2 Norm-Based Strategy for KV
Cache Compression", EMNLP 2024 (arXiv:2406.11430). Keys with a low L2 norm tend to receive high
attention, so the negative key norm is a query-free importance score: every slot scores
``-||k||_2`` (in float32 at least), and each KV head keeps its own best-scored context tokens.
Nothing is protected (no sinks, no recent window), as in the paper and in NVIDIA kvpress's
``KnormPress``.

kvpress equivalence: ``knorm:keep_ratio=r`` keeps, per layer and KV head, exactly the positions
``KnormPress(compression_ratio=1 - r)`` keeps under the query-agnostic protocol (a differential
test checks this on the default model). The norm is RoPE-invariant, so it does not matter that
the cache holds rotated keys. Under the default question-aware protocol the question's keys are
scored too but are never candidates, so the result is the same as without the question.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import attrs
import torch

from kvlab_plugins.sink_window import SinkWindowBudgeter
from kvlab_plugins.topk import TopKSelector
from kvpress_lab.hookspecs import hookimpl
from kvpress_lab.interfaces import Scorer, StepLayout
from kvpress_lab.policy import Composition, Policy


def knorm_scores(keys: torch.Tensor) -> torch.Tensor:
    """``keys`` [..., N, D] -> [..., N]: the negative L2 norm, float32 (float64 stays float64)."""
    dtype = torch.promote_types(keys.dtype, torch.float32)
    return -torch.linalg.vector_norm(keys, dim=-1, dtype=dtype)


@attrs.define(kw_only=True)
class KnormScorer(Scorer):
    """Negative L2 norm of every cached key: low-norm keys score highest. [Ly, H, N]."""

    name: ClassVar[str] = "knorm"
    layer_local: ClassVar[bool] = True  # a layer's scores read only that layer

    def score(
        self,
        layout: StepLayout,
        observed: Sequence[torch.Tensor | None],
        candidates: torch.Tensor,
        cache_keys: Callable[[int], torch.Tensor],
    ) -> torch.Tensor:
        layers = layout.context_index.shape[0]
        device = cache_keys(0).device  # scores stay on the model's device (no host copy)
        return torch.stack([knorm_scores(cache_keys(i)[0]).to(device) for i in range(layers)])


@attrs.define(kw_only=True)
class KnormPolicy(Policy):
    """Knorm: the lowest-norm keys per KV head, one-shot after prefill, original positions."""

    name: ClassVar[str] = "knorm"

    def compose(self) -> Composition:
        return Composition(
            budgeter=self.build(SinkWindowBudgeter),
            scorers={"main": KnormScorer()},
            selector=TopKSelector(scorer="main", granularity="head"),
        )


@hookimpl
def kvlab_scorers() -> list[type]:
    return [KnormScorer]


@hookimpl
def kvlab_policies() -> list[type]:
    return [KnormPolicy]
