"""The ``keynorm`` policy: keep the keys with the smallest L2 norm.

Devoto, Zhao, Scardapane and Minervini (2024), "A Simple and Effective L2 Norm-Based Strategy for
KV Cache Compression" (EMNLP 2024) observe that keys with a low L2 norm tend to receive high
attention, so the key norm alone is a query-free importance score. This module is a complete
kvpress-lab plugin: a scorer, and a policy that composes it with the first-party ``topk`` selector
and ``sink_window`` budgeter.
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
from kvpress_lab.policy import Composition, EngineOptions, Policy, positive_int
from kvpress_lab.selection import Granularity


@attrs.define(kw_only=True)
class KeyNormScorer(Scorer):
    """Score every slot by the negative L2 norm of its key: low-norm keys score highest."""

    name: ClassVar[str] = "keynorm"

    def score(
        self,
        layout: StepLayout,
        observed: Sequence[torch.Tensor | None],
        candidates: torch.Tensor,
        cache_keys: Callable[[int], torch.Tensor],
    ) -> torch.Tensor:
        layers = layout.context_index.shape[0]
        # cache_keys(layer) is [batch=1, kv_heads, slots, head_dim]
        norms = [cache_keys(layer)[0].float().norm(dim=-1) for layer in range(layers)]
        return -torch.stack(norms)  # [layers, kv_heads, slots]


@attrs.define(kw_only=True)
class KeyNormPolicy(Policy):
    """Keeps the lowest-norm keys per KV head, plus ``sinks`` first tokens and a recent window."""

    name: ClassVar[str] = "keynorm"
    sinks: int = attrs.field(default=4, validator=attrs.validators.ge(0))
    window: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    granularity: Granularity = attrs.field(
        default="head", validator=attrs.validators.in_(("global", "layer", "head"))
    )
    block_size: int | None = attrs.field(default=None, validator=positive_int)

    def compose(self) -> Composition:
        return Composition(
            budgeter=SinkWindowBudgeter(
                keep_ratio=self.keep_ratio, budget=self.budget, sinks=self.sinks, window=self.window
            ),
            selector=TopKSelector(scorer="main", granularity=self.granularity),
            scorers={"main": KeyNormScorer()},
            engine=EngineOptions(block_size=self.block_size),
        )


@hookimpl
def kvlab_scorers() -> list[type]:
    return [KeyNormScorer]


@hookimpl
def kvlab_policies() -> list[type]:
    return [KeyNormPolicy]
