"""PyramidKV: per-layer budgets that shrink with depth, SnapKV scores inside each layer.

Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling",
2024 (arXiv:2406.02069; code: Zefan-Cai/KVCache-Factory). Attention in the lower layers spreads
over the whole prompt, higher layers concentrate on a few tokens ("pyramidal information
funneling"), so the lower layers get larger caches and the higher layers smaller ones while the
total over layers stays that of a uniform budget. Inside a layer every KV head keeps its best
tokens by SnapKV's window votes (the scorer and its parameters are SnapKV's own, exposed here).

The per-layer counts follow NVIDIA kvpress's ``PyramidKVPress.get_layer_budget`` (itself the
KVCache-Factory formula with the budget written as a fraction of the context), with ``C`` the
uniform budget (:func:`~kvpress_lab.policy.budget_tokens`), ``W`` the observation window, ``L``
the context length and ``Ly`` the number of layers:

* ``min = C / beta`` and ``max = 2 C - min`` (the arithmetic mean of the two is ``C``);
* when ``max >= L - W``: ``max = L - W`` and ``min = 2 C - max``;
* when ``L >= max >= min >= W`` does not hold the pyramid does not fit and every layer keeps
  ``C`` (SnapKV's uniform budget, kvpress's fallback);
* otherwise layer ``l`` keeps ``round(max - l (max - min) / (Ly - 1))`` context tokens, its
  observation-window tokens included.

Rounding: the counts are computed in exact rational arithmetic and rounded half to even (Python's
``round``). Layers ``l`` and ``Ly - 1 - l`` sit at ``C + d`` and ``C - d``; both round to integers
summing to ``2 C`` (when ``d`` ends in one half they go to the two neighbours of opposite parity),
so the total over layers is exactly ``Ly * C``, the uniform total, with no correction step.

Where this differs from kvpress (differences of budget vocabulary, not of the formula): kvpress
starts from ``L * (1 - compression_ratio)`` as a float, ours from the integer
``floor(keep_ratio * L)``, so when ``keep_ratio * L`` is not a whole number kvpress's total is
off the uniform one by the fractional part times ``Ly`` (rounded), ours is not; kvpress's fallback
rounds ``L * (1 - compression_ratio)`` where ours floors it like every policy; and with a
one-layer model kvpress keeps ``round(max)`` where ours keeps ``C``. When ``keep_ratio * L`` is
a whole number and the model has several layers, the counts are kvpress's, layer for layer.
"""

from __future__ import annotations

from fractions import Fraction
from typing import ClassVar

import attrs
import torch

from kvlab_plugins.observation_window import ObservationWindowBudgeter
from kvlab_plugins.snapkv import SnapKVScorer
from kvlab_plugins.topk import TopKSelector
from kvpress_lab.hookspecs import hookimpl
from kvpress_lab.interfaces import Allocation, StepLayout
from kvpress_lab.params import Expose, policy_with
from kvpress_lab.policy import Composition, EngineOptions
from kvpress_lab.validators import int_at_least

check_beta = int_at_least(
    1, "the pyramid's steepness: the top layer keeps 1/beta of the uniform budget, e.g. beta=20"
)


def pyramid_layer_counts(
    context_length: int, target: int, window: int, beta: int, n_layers: int
) -> list[int]:
    """Context tokens kept per layer (window included), deepest layer last.

    Args:
        context_length: ``L``, the context tokens.
        target: ``C``, the uniform per-layer budget (``budget_tokens``); the mean of the result.
        window: ``W``, the observation window, a lower bound of every layer's count.
        beta: the steepness (``min = C / beta`` before the upper clamp).
        n_layers: ``Ly``.
    Returns:
        ``Ly`` integers summing to ``Ly * C`` (see the module docstring for the formula, the
        fallback to ``C`` everywhere and the rounding).
    """
    c = Fraction(target)
    low = c / beta
    high = 2 * c - low
    if high >= context_length - window:
        high = Fraction(context_length - window)
        low = 2 * c - high
    if n_layers <= 1 or not (context_length >= high >= low >= window):
        return [target] * n_layers
    step = (high - low) / (n_layers - 1)
    return [round(high - layer * step) for layer in range(n_layers)]


@attrs.define(kw_only=True)
class PyramidBudgeter(ObservationWindowBudgeter):
    """Per-layer budgets decreasing linearly with depth, total equal to the uniform budget.

    Each layer protects the context tokens inside the observation window (as SnapKV does) and
    keeps ``count[l] - W_ctx`` candidates, ``count`` from :func:`pyramid_layer_counts`; the
    allocation's ``k`` is a ``[Ly, 1]`` long tensor (every KV head of a layer keeps the same
    number). :meth:`target_tokens` stays the per-layer mean, ``C``.
    """

    name: ClassVar[str] = "pyramid"
    beta: int = attrs.field(default=20, validator=check_beta)

    def layer_counts(self, context_length: int, n_layers: int) -> list[int]:
        """Context tokens each layer keeps when the whole context is visible."""
        target = self.target_tokens(context_length)
        return pyramid_layer_counts(context_length, target, self.window, self.beta, n_layers)

    def allocate(self, layout: StepLayout) -> Allocation:
        ctx = ~layout.question_mask
        n_ctx = int(ctx[0, 0].sum())
        n_layers = int(layout.context_index.shape[0])
        counts = [min(n, n_ctx) for n in self.layer_counts(layout.context_length, n_layers)]
        if min(counts) >= n_ctx:
            return Allocation.keep_all(layout)
        # the window's context slots: the same in every layer (each count is at least W)
        w_ctx = self.window_context_slots(layout, min(counts))
        rank = torch.cumsum(ctx.to(torch.long), dim=-1) - 1
        protected = ctx & (rank >= n_ctx - w_ctx)
        if len(set(counts)) == 1:  # the fallback: a plain uniform budget, dense cache
            k: int | torch.Tensor = counts[0] - w_ctx
        else:
            k = torch.tensor([[n - w_ctx] for n in counts], dtype=torch.long)
        return Allocation(protected=protected, candidates=ctx & ~protected, k=k)


@attrs.define(kw_only=True)
class PyramidKVPolicy(policy_with(SnapKVScorer, Expose(PyramidBudgeter, share="window"))):
    """PyramidKV (Cai et al. 2024): SnapKV scores, per-layer budgets shaped like a pyramid.

    Parameters are SnapKV's (``window``, ``kernel``, ``pooling``, ``aggregation``) and the
    budgeter's ``beta``; ``window`` is both the scorer's observation window and the ``W`` of the
    budget formula. ``window=64,kernel=5,pooling=avg`` reproduces kvpress's ``PyramidKVPress``
    (whose ``window_size`` and ``kernel_size`` these are). One-shot after the prefill, original
    positions: unequal per-layer counts are stored in the engine's ragged cache.
    """

    name: ClassVar[str] = "pyramidkv"

    def compose(self) -> Composition:
        return Composition(
            budgeter=self.build(PyramidBudgeter),
            scorers={"main": self.build(SnapKVScorer)},
            selector=TopKSelector(scorer="main", granularity="head"),
            engine=EngineOptions(observation_window=self.window),
        )


@hookimpl
def kvlab_budgeters() -> list[type]:
    return [PyramidBudgeter]


@hookimpl
def kvlab_policies() -> list[type]:
    return [PyramidKVPolicy]
