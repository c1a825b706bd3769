"""TOVA: keep the tokens the last token attends to, one index set per layer.

Oren, Hassid, Yarden, Adi and Schwartz, "Transformers are Multi-State RNNs", EMNLP 2024
(arXiv:2401.06104; official code: schwartz-lab-NLP/TOVA). TOVA (Token Omission Via Attention)
scores every cached token by the softmax attention the *last* token pays to it, averaged over all
attention heads of the layer, and drops the lowest-scored tokens: every KV head of a layer keeps
the same positions.

Here the observed row is the last row of the forward pass: the last question token in the default
question-aware protocol, the last context token under the query-agnostic one. The score of slot
``j`` in layer ``l`` is ``mean over all query heads of softmax(q_last . k / sqrt(d))[j]`` (float32;
under GQA the mean runs over every query head, not per KV head, as in the official code and
kvpress). The ``observation_window`` budgeter with a window of one row protects the observing
token's own slot when it is a context token (query-agnostic), exactly as kvpress's ``TOVAPress``
pads the last token with ``max + 1``; with the question visible nothing is protected.

kvpress equivalence: ``tova:keep_ratio=r`` keeps, per layer, exactly the positions
``TOVAPress(compression_ratio=1 - r)`` keeps under the query-agnostic protocol (a differential
test checks this on the default model). The official TOVA evicts one token per generated token;
this policy, like kvpress, compresses once after prefill.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import attrs
import torch

from kvlab_plugins.observation_window import ObservationWindowBudgeter
from kvlab_plugins.topk import TopKSelector
from kvpress_lab.hookspecs import hookimpl
from kvpress_lab.interfaces import LayerObservation, Scorer, StepLayout
from kvpress_lab.policy import Composition, EngineOptions, Policy


def tova_scores(attn: torch.Tensor) -> torch.Tensor:
    """``attn`` [B, H, G, 1, N] softmax attention of the last row -> [1, N], mean over all heads."""
    return attn.float().mean(dim=(0, 1, 2, 3))[None, :]


@attrs.define(kw_only=True)
class TOVAScorer(Scorer):
    """The last row's attention, averaged over every query head of the layer: [Ly, 1, N]."""

    name: ClassVar[str] = "tova"
    layer_local: ClassVar[bool] = True  # a layer's scores read only that layer

    def observe(self, obs: LayerObservation) -> torch.Tensor:
        n = obs.keys.shape[2]
        total = torch.zeros(1, n, device=obs.keys.device)
        count = 0
        # memory-bounded blocks of the last row's attention (KV-head chunks at long contexts)
        for blk in obs.attention_blocks(slice(obs.n_rows - 1, obs.n_rows)):
            if blk.complete:
                return tova_scores(blk.weights)
            total[0, blk.keys] += blk.weights.sum(dim=(0, 1, 2, 3))
            count += blk.weights[..., 0, 0].numel()  # B x heads x G query heads of the block
        return total / max(count, 1)

    def score(
        self,
        layout: StepLayout,
        observed: Sequence[torch.Tensor | None],
        candidates: torch.Tensor,
        cache_keys: Callable[[int], torch.Tensor],
    ) -> torch.Tensor:
        device = observed[0].device  # scores stay on the model's device (no host copy)
        return torch.stack([o.to(device) for o in observed])  # [Ly, 1, N]


@attrs.define(kw_only=True)
class TOVAPolicy(Policy):
    """TOVA, one-shot after prefill, one index set per layer, original positions."""

    name: ClassVar[str] = "tova"

    def compose(self) -> Composition:
        return Composition(
            budgeter=self.build(ObservationWindowBudgeter, window=1),
            scorers={"main": TOVAScorer()},
            selector=TopKSelector(scorer="main", granularity="layer"),
            engine=EngineOptions(observation_window=1),
        )


@hookimpl
def kvlab_scorers() -> list[type]:
    return [TOVAScorer]


@hookimpl
def kvlab_policies() -> list[type]:
    return [TOVAPolicy]
