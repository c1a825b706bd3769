"""H2O: heavy hitters by accumulated attention, plus a recent window.

Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models", NeurIPS 2023 (official code: FMInference/H2O). The score of key ``j`` is the SUM over
every prompt query ``i >= j`` of its causal softmax weight on ``j`` (a sum, not a mean, so early
keys collect more votes, as in the official code). Under GQA the scores of the query heads that
share a KV head are summed as well (the same sum, extended to the group). Each KV head keeps the
most recent ``C * recent_fraction`` context tokens (official ``recent_ratio == heavy_ratio``:
half) and the best-scored rest.

The official "real drop" cache compresses once at the end of prefill and then evicts one token per
generated token, so the cache stays at ``C``. ``decode_eviction=True`` is that faithful variant:
a decode evictor keeps accumulating the attention the question and generated tokens pay to every
cached key and evicts the lowest-scored non-recent key after every forward pass. It is off by
default so that every policy answers from the same cache size as the others. In the engine's
question-aware protocol the question is fed twice (during prefill, then again to answer), so with
decode eviction its attention is accumulated twice; this only adds the same question's votes
once more.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import attrs
import torch

from kvlab_plugins.sink_window import SinkWindowBudgeter
from kvlab_plugins.topk import TopKSelector
from kvpress_lab.hookspecs import hookimpl
from kvpress_lab.interfaces import KVCacheView, LayerObservation, Scorer, StepLayout
from kvpress_lab.params import Expose, policy_with
from kvpress_lab.policy import Composition
from kvpress_lab.validators import positive_int, unit_interval

check_recent_fraction = unit_interval(
    "the share of the budget given to the most recent tokens (H2O: 0.5)"
)


def accumulated_attention(obs: Any, query_block: int) -> torch.Tensor:
    """Sum of causal softmax attention over all rows of the pass and the query heads of each KV
    head: [H, N] float32.

    The weights come from :meth:`~kvpress_lab.interfaces.LayerObservation.attention_blocks`, at
    most ``query_block`` rows and the engine's attention chunk of weights at a time (the official
    code forms the whole ``[heads, rows, N]`` matrix; at 128k keys that is hundreds of GiB). A
    block's rows only see keys up to its last row, so later keys are left out of its product.
    """
    total = None
    for blk in obs.attention_blocks(slice(0, obs.n_rows), max_rows=query_block):
        if total is None:
            n_heads, n_keys = obs.keys.shape[1], obs.n_past + obs.n_rows
            total = blk.weights.new_zeros(n_heads, n_keys)
        total[blk.heads, blk.keys] += blk.weights.sum(dim=(0, 2, 3))
    if total is None:  # no rows
        total = torch.zeros(obs.keys.shape[1], obs.n_past, device=obs.keys.device)
    return total


def _cpu_flash_attention() -> Callable[..., tuple[torch.Tensor, torch.Tensor]] | None:
    """PyTorch's fused CPU attention kernel, which also returns each row's log-sum-exp."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def fused_column_sums(obs: LayerObservation) -> torch.Tensor | None:
    """:func:`accumulated_attention` from two fused attention passes, or None where not exact.

    The column sum of key ``j`` is ``sum_{i >= j} exp(s q_i.k_j - lse_i)`` with ``lse_i`` the
    log-sum-exp of row ``i``'s logits. The first pass (causal attention of the rows) returns
    every ``lse_i``; the second runs attention the other way round, over the reversed sequence
    so that it is causal again: key ``j`` asks, row ``i`` answers with the logit
    ``[s q_i, -lse_i] . [k_j, 1]``, and that pass's log-sum-exp is the log of the column sum.
    Neither pass forms a weight matrix (the kernel works in cache-sized tiles); the inputs are
    ``[B, H_q, n, head_dim + 1]``, the size of the queries themselves. The sums are H2O's exactly, up to
    float32 rounding in a different order (the tests compare with eager attention).

    Used for a pass over the whole sequence (no past slots: decode eviction and block-wise
    steps keep the block path) on CPU, without logit soft-capping (the kernel cannot cap).
    """
    flash = _cpu_flash_attention()
    if (
        flash is None
        or obs.keys.device.type != "cpu"
        or obs.n_past != 0
        or obs.adapter.logit_softcap(obs.layer_idx)
    ):
        return None
    queries = obs.queries(slice(0, obs.n_rows)).float()  # [B, H_q, n, D]
    b, hq, n, _ = queries.shape
    n_kv = obs.keys.shape[1]
    # no past, so the keys are the rows'; the kernel takes one key head per query head
    keys = obs.keys.float().repeat_interleave(hq // n_kv, dim=1)
    scaling = obs.adapter.scaling(obs.layer_idx)
    _, lse = flash(queries, keys, keys, 0.0, True, scale=scaling)  # [B, H_q, n]
    rows = torch.cat([queries * scaling, -lse.unsqueeze(-1)], dim=-1).flip(2)
    cols = torch.cat([keys, queries.new_ones(b, hq, n, 1)], dim=-1).flip(2)
    _, lse_cols = flash(cols, rows, cols, 0.0, True, scale=1.0)
    total = lse_cols.flip(-1).exp().view(b, n_kv, hq // n_kv, n).sum(dim=(0, 2))
    return total


def h2o_keep(scores: torch.Tensor, budget: int, recent: int) -> torch.Tensor:
    """Slots kept by H2O per head: [H, budget], sorted.

    ``scores`` [H, n]: keep the last ``recent`` slots and the ``budget - recent`` best-scored of
    the others.
    """
    h, n = scores.shape
    device = scores.device
    if n <= budget:
        return torch.arange(n, device=device).expand(h, n)
    recent = min(recent, budget)
    heavy = budget - recent
    older = scores[:, : n - recent]
    top = older.topk(heavy, dim=-1).indices if heavy else older.new_empty(h, 0, dtype=torch.long)
    window = torch.arange(n - recent, n, device=device).expand(h, recent)
    keep = torch.cat([top, window], dim=-1)
    return keep.sort(dim=-1).values


@attrs.define(kw_only=True)
class H2OScorer(Scorer):
    """Accumulated causal attention of every row of the pass, per KV head.

    :func:`fused_column_sums` where it applies (a whole-sequence pass on CPU), else the block
    path :func:`accumulated_attention` with at most ``query_block`` rows at a time.
    """

    name: ClassVar[str] = "h2o"
    layer_local: ClassVar[bool] = True  # a layer's scores read only that layer
    # reads every row's queries: take the pass's own projection instead of projecting again
    needs_projected_queries: ClassVar[bool] = True
    query_block: int = attrs.field(default=256, validator=positive_int)
    # (context_index, scores) of the last step that was scored; read by the decode evictor
    last: tuple[torch.Tensor, torch.Tensor] | None = attrs.field(
        default=None, init=False, repr=False
    )

    def observe(self, obs: LayerObservation) -> torch.Tensor:
        fused = fused_column_sums(obs)
        return fused if fused is not None else accumulated_attention(obs, self.query_block)

    def score(
        self,
        layout: StepLayout,
        observed: Sequence[torch.Tensor | None],
        candidates: torch.Tensor,
        cache_keys: Callable[[int], torch.Tensor],
    ) -> torch.Tensor:
        scores = torch.stack(list(observed))  # [Ly, H, N], on the model's device
        if layout.first_layer == 0:
            self.last = (layout.context_index, scores)
        else:  # layer-wise compression scores layers 0, 1, ... one at a time: append the layer
            index, before = self.last
            self.last = (torch.cat([index, layout.context_index]), torch.cat([before, scores]))
        return scores

    def kept_scores(self, context_index: torch.Tensor) -> torch.Tensor:
        """Prefill scores of the kept slots ``context_index`` [Ly, H, k] (zeros if unscored).

        Runs once per answer, before decoding; the scores stay on their device.
        """
        if self.last is None:
            return torch.zeros(context_index.shape, dtype=torch.float32)
        step_index, scores = self.last
        length = int(max(int(step_index.max()), int(context_index.max()))) + 1
        table = torch.zeros(*scores.shape[:2], length + 1, dtype=scores.dtype, device=scores.device)
        slot = torch.where(step_index >= 0, step_index, torch.full_like(step_index, length))
        table.scatter_(-1, slot.to(scores.device).expand_as(scores), scores)
        return table.gather(-1, context_index.to(scores.device))


@attrs.define(kw_only=True)
class _AccumulatedAttention(Scorer):
    """Observes every row of a decode forward pass (the engine passes all rows in)."""

    name: ClassVar[str] = "h2o_decode"
    query_block: int = 256

    def observe(self, obs: LayerObservation) -> torch.Tensor:
        return accumulated_attention(obs, self.query_block)

    def score(self, layout, observed, candidates, cache_keys) -> torch.Tensor:
        # the engine hands the per-layer sums to the eviction directly; as a scorer they stack
        return torch.stack([o.to(observed[0].device) for o in observed])  # [Ly, H, N]


class H2OEviction:
    """Decode-time H2O for one answer: accumulate attention, evict down to the budget.

    The engine runs :attr:`scorer` over the rows of every decode forward pass and hands its
    per-layer attention to :meth:`after_forward`, which adds it to every cached key's score and
    keeps, per layer and KV head, the ``recent`` latest slots and the best-scored others.
    """

    def __init__(self, scores: list[torch.Tensor], budget: int, recent: int, query_block: int):
        self.scores = scores  # per layer [H, n_slots]
        self.budget, self.recent = budget, recent
        self.scorer = _AccumulatedAttention(query_block=query_block)

    def after_forward(self, cache: KVCacheView, observed) -> None:
        for layer in range(cache.n_layers):
            new = observed[layer].to(self.scores[layer].device)
            old = self.scores[layer]
            new[:, : old.shape[-1]] += old
            self.scores[layer] = new
            n = cache.length(layer)
            if n <= self.budget:
                continue
            keep = h2o_keep(self.scores[layer][:, :n], self.budget, self.recent)  # [H, C]
            self.scores[layer] = self.scores[layer].gather(-1, keep.to(new.device))
            cache.keep(layer, keep)


@attrs.define(kw_only=True)
class H2ODecodeEvictor:
    """Starts an :class:`H2OEviction` over the compressed cache, seeded with prefill scores."""

    scorer: H2OScorer
    recent_fraction: float = attrs.field(default=0.5, validator=check_recent_fraction)
    query_block: int = attrs.field(default=256, validator=positive_int)

    def start(self, lm, state) -> H2OEviction:
        scores = self.scorer.kept_scores(state.context_index)  # [Ly, H, k]
        per_layer = []
        for layer in range(scores.shape[0]):
            n = state.held_tokens  # a question kept (nothing evicted) has no votes yet
            s = scores[layer]
            if n > s.shape[-1]:  # question slots kept (nothing was evicted): no votes yet
                s = torch.cat([s, s.new_zeros(s.shape[0], n - s.shape[-1])], dim=-1)
            per_layer.append(s.clone())
        budget = state.kept_tokens
        recent = int(budget * self.recent_fraction)
        return H2OEviction(per_layer, budget, recent, self.query_block)


@attrs.define(kw_only=True)
class H2OPolicy(
    policy_with(
        Expose(H2ODecodeEvictor, only=("recent_fraction", "query_block")),
        Expose(H2OScorer, share="query_block"),
    )
):
    """H2O: heavy hitters + recent window, per KV head, one-shot after prefill.

    ``recent_fraction`` (the decode evictor's) also sizes the prefill recent window;
    ``query_block`` feeds the decode evictor and the scorer. ``decode_eviction=True`` is the
    faithful variant (cache held at ``C`` while decoding).
    """

    name: ClassVar[str] = "h2o"
    decode_eviction: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))

    def compose(self) -> Composition:
        scorer = self.build(H2OScorer)
        evictor = self.build(H2ODecodeEvictor, scorer=scorer) if self.decode_eviction else None
        return Composition(
            budgeter=self.build(SinkWindowBudgeter, window_fraction=self.recent_fraction),
            scorers={"main": scorer},
            selector=TopKSelector(scorer="main", granularity="head"),
            decode_evictor=evictor,
        )


@hookimpl
def kvlab_scorers() -> list[type]:
    return [H2OScorer]


@hookimpl
def kvlab_policies() -> list[type]:
    return [H2OPolicy]
