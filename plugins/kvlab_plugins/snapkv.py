"""SnapKV: keep the keys the last prompt rows attend to, pooled along the sequence.

Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024
(official code: FasterDecoding/SnapKV). The trailing ``window`` rows of the prompt (the question,
when it is appended) vote for earlier keys with their softmax attention; the votes are summed over
the window, smoothed by a 1-D pooling along the sequence and, under GQA, averaged over the query
heads sharing a KV head. Each KV head keeps its own top keys before the window plus the context
tokens inside the window.

Defaults follow the paper's LongBench configuration (window 32, kernel 7, max pooling).
``window=64,kernel=5,pooling=avg`` reproduces NVIDIA kvpress's ``SnapKVPress`` index for index.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar, Literal

import attrs
import torch
import torch.nn.functional as F

from kvlab_plugins.observation_window import ObservationWindowBudgeter
from kvlab_plugins.topk import TopKSelector
from kvpress_lab.hookspecs import hookimpl
from kvpress_lab.interfaces import LayerObservation, Scorer, StepLayout
from kvpress_lab.params import Expose, policy_with
from kvpress_lab.policy import Composition, EngineOptions
from kvpress_lab.validators import odd_kernel, positive_int

Pooling = Literal["max", "avg"]
Aggregation = Literal["sum", "mean"]


def snapkv_votes(attn: torch.Tensor, n_pre: int) -> torch.Tensor:
    """Summed window votes on the first ``n_pre`` keys: ``attn`` [B, H, G, w, N] -> [H, G, n_pre]."""
    return attn[..., :n_pre].float().sum(dim=(0, 3))


def snapkv_pool(votes: torch.Tensor, n: int, kernel: int, pooling: Pooling) -> torch.Tensor:
    """Pool ``votes`` [H, G, n_pre] along the keys, average the group: [H, n], zero past n_pre."""
    h, g, n_pre = votes.shape
    out = torch.zeros(h, n, dtype=torch.float32, device=votes.device)
    if n_pre <= 0:
        return out
    pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
    pooled = pool(votes.reshape(h * g, 1, n_pre), kernel_size=kernel, stride=1, padding=kernel // 2)
    # GQA: one score per KV head, the mean over its query heads (kvpress; SnapKV issue #22)
    out[:, :n_pre] = pooled.reshape(h, g, n_pre).mean(dim=1)
    return out


def snapkv_window_scores(
    attn: torch.Tensor, kernel: int, pooling: Pooling, aggregation: Aggregation
) -> torch.Tensor:
    """SnapKV scores [H, N] float32 from the window rows' attention ``attn`` [B, H, G, w, N].

    The window rows are the last ``w`` slots; their votes on the keys before the window are
    pooled and group-averaged; the window's own slots score zero (the budgeter decides them).
    """
    _, _, _, w, n = attn.shape
    votes = snapkv_votes(attn, max(0, n - w))
    return snapkv_pool(votes / w if aggregation == "mean" else votes, n, kernel, pooling)


@attrs.define(kw_only=True)
class SnapKVScorer(Scorer):
    """Window-attention votes, pooled along the sequence; one score row per KV head."""

    name: ClassVar[str] = "snapkv_window"
    layer_local: ClassVar[bool] = True  # a layer's scores read only that layer
    window: int = attrs.field(default=32, validator=positive_int)
    kernel: int = attrs.field(default=7, validator=odd_kernel)
    pooling: Pooling = attrs.field(default="max", validator=attrs.validators.in_(("max", "avg")))
    aggregation: Aggregation = attrs.field(
        default="sum", validator=attrs.validators.in_(("sum", "mean"))
    )

    def observe(self, obs: LayerObservation) -> torch.Tensor:
        # the last `window` rows of the forward input: the question when it is appended,
        # the trailing context rows under the query-agnostic protocol
        rows = slice(max(0, obs.n_rows - self.window), obs.n_rows)
        _, h, n, _ = obs.keys.shape
        w = rows.stop - rows.start
        n_pre = max(0, n - w)
        votes = None
        # memory-bounded blocks (causal inside the window, float32), summed into [H, G, n_pre]
        for blk in obs.attention_blocks(rows):
            part = snapkv_votes(blk.weights, min(n_pre, blk.keys.stop))
            if votes is None:
                votes = part.new_zeros(h, part.shape[1], n_pre)
            votes[blk.heads, :, : part.shape[-1]] += part
        if votes is None:  # no rows to observe
            return torch.zeros(h, n, device=obs.keys.device)
        votes = votes / w if self.aggregation == "mean" else votes
        return snapkv_pool(votes, n, self.kernel, self.pooling)

    def score(
        self,
        layout: StepLayout,
        observed: Sequence[torch.Tensor | None],
        candidates: torch.Tensor,
        cache_keys: Callable[[int], torch.Tensor],
    ) -> torch.Tensor:
        return torch.stack(list(observed))  # [Ly, H, N], on the model's device


@attrs.define(kw_only=True)
class SnapKVPolicy(policy_with(SnapKVScorer, Expose(ObservationWindowBudgeter, share="window"))):
    """SnapKV, one-shot after prefill, per KV head, original positions.

    The parameters are the scorer's; the budgeter's ``window`` is the scorer's. The budget counts
    the context tokens that fall inside the observation window (protected), so at one keep_ratio
    SnapKV keeps exactly as many context tokens as every other policy.
    """

    name: ClassVar[str] = "snapkv"

    def compose(self) -> Composition:
        return Composition(
            budgeter=self.build(ObservationWindowBudgeter),
            scorers={"main": self.build(SnapKVScorer)},
            selector=TopKSelector(scorer="main", granularity="head"),
            engine=EngineOptions(observation_window=self.window),
        )


@hookimpl
def kvlab_scorers() -> list[type]:
    return [SnapKVScorer]


@hookimpl
def kvlab_policies() -> list[type]:
    return [SnapKVPolicy]
