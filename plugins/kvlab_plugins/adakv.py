"""Ada-KV: each layer's budget pooled across its KV heads, with a per-head safeguard.

Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient
LLM Inference", 2024 (arXiv:2407.11550; code: FFY0/AdaKV). A uniform budget gives every head the
same number of tokens although some heads concentrate their attention on a few tokens and others
spread it wide. Ada-KV keeps, per layer, the best scores of *all* heads together, so concentrated
heads give up tokens to dispersed ones at an unchanged layer total; a safeguard keeps every head's
own best ``alpha_safeguard`` share of its uniform budget first, so no head is emptied.

The scores come from any registered policy (``scorer=snapkv``, ``expected_attention``, ``knorm``,
a kvpress press through ``kvpress`` ...): its budgeter and scorers are reused through
:func:`kvpress_lab.reuse.reuse_scoring` and only the selection changes, like ChunkKV's.

Selection per layer, with ``p_h`` the protected slots and ``k_h`` the candidates the reused
budgeter gives head ``h``:

1. the safeguard: ``s_h = floor(alpha_safeguard * (p_h + k_h))``, at least 1 when
   ``alpha_safeguard > 0`` and the head keeps anything; the head's protected slots count first
   (they are kept anyway), so it keeps its ``min(k_h, max(0, s_h - p_h))`` best candidates;
2. the pool: the layer's remaining budget, ``sum_h k_h`` minus what step 1 took, goes to the best
   remaining candidates of all the layer's heads together (ties: the lower head, then the lower
   slot, as a flat top-k over ``[H * N]``).

Heads then keep different numbers of tokens and the engine stores the cache ragged (one-shot,
original positions), so the memory saved is real: the layer total, and so the cache's bytes, are
those of the uniform budget.

Where this follows kvpress (``AdaKVPress``) and not the Ada-KV reference code: the safeguard is
a share of the head's whole kept count with the protected slots counted first. kvpress computes
``int(alpha_safeguard * n_kept)`` over all scores, SnapKV's observation window padded above every
other score, so with a 64-token window and ``n_kept = 250`` its 50 safeguarded slots are window
slots; the reference code takes the share of the budget *without* the window. kvpress's budget is
``compression_ratio``, the fraction removed; ours ``keep_ratio``, the fraction kept
(``n_kept = floor(keep_ratio * L)`` both ways when ``keep_ratio * L`` is a whole number).
kvpress masks the evicted keys and keeps the full cache allocated; here they are gone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import attrs
import torch

from kvpress_lab.hookspecs import hookimpl
from kvpress_lab.interfaces import Budgeter, Scorer, ScoreSource, Selector, StepLayout
from kvpress_lab.params import Expose, policy_with
from kvpress_lab.policy import Composition
from kvpress_lab.reuse import ReusesScoring
from kvpress_lab.selection import topk_candidates
from kvpress_lab.validators import unit_interval

PROTECTED = "protected_slots"
"""Scorer name under which the adakv selector reads the reused budgeter's protected slots."""


@attrs.define(kw_only=True)
class ProtectedSlotsScorer(Scorer):
    """1.0 on the slots ``budgeter`` protects at this step, 0.0 elsewhere: [Ly|1, H|1, N].

    Lets a selector count each head's protected slots (Ada-KV's safeguard counts them) through
    the public score interface; the budgeter is asked again with the step's layout.
    """

    name: ClassVar[str] = "protected_slots"
    budgeter: Budgeter

    def score(
        self,
        layout: StepLayout,
        observed: Sequence[torch.Tensor | None],
        candidates: torch.Tensor,
        cache_keys: Callable[[int], torch.Tensor],
    ) -> torch.Tensor:
        return self.budgeter.allocate(layout).protected.float()


def _counts(k: int | torch.Tensor, lead: tuple[int, int]) -> torch.Tensor:
    """An allocation's ``k`` as long ``[Ly, H]`` counts on the host."""
    if isinstance(k, torch.Tensor):
        return k.to(device="cpu", dtype=torch.long).expand(lead)
    return torch.full(lead, int(k), dtype=torch.long)


def adakv_select(
    scores: torch.Tensor,
    candidates: torch.Tensor,
    k: int | torch.Tensor,
    alpha_safeguard: float,
    protected: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ada-KV's kept candidates: each head's safeguard, then the layer's best pooled across heads.

    Args:
        scores: [Ly|1, H|1, N] per-head scores (higher is kept first).
        candidates: [Ly|1, H|1, N] bool.
        k: candidates per head, an int or a long ``[Ly|1, H|1]`` tensor; a layer keeps the sum
            of its heads' counts.
        alpha_safeguard: the share of each head's kept count guaranteed to its own best slots.
        protected: [Ly|1, H|1, N] slots kept anyway (they count first towards the safeguard);
            None for none.
    Returns:
        Bool mask [Ly, H, N] of the kept candidates; head ``h`` of layer ``l`` keeps at least
        its safeguard, layer ``l`` exactly ``sum_h k[l, h]``.
    """
    lead = torch.broadcast_shapes(scores.shape[:2], candidates.shape[:2])
    if isinstance(k, torch.Tensor):
        lead = torch.broadcast_shapes(lead, tuple(k.shape))
    ly, h = lead
    n = scores.shape[-1]
    device = scores.device
    finite = torch.finfo(torch.float32)
    # a candidate scored -inf must still outrank the -inf the top-k gives non-candidates
    scores = scores.float().nan_to_num(nan=finite.min, posinf=finite.max, neginf=finite.min)
    scores = scores.expand(ly, h, n)
    cand = candidates.to(device=device, dtype=torch.bool).expand(ly, h, n)
    counts = _counts(k, (ly, h))
    n_protected = (
        torch.zeros(ly, h, dtype=torch.long)
        if protected is None
        else protected.to("cpu", torch.bool).expand(ly, h, n).sum(-1)
    )
    kept = n_protected + counts
    safe = (kept.double() * alpha_safeguard).floor().long()
    if alpha_safeguard > 0:
        safe = torch.where(kept > 0, safe.clamp(min=1), 0)
    guard = torch.minimum((safe - n_protected).clamp(min=0), counts)
    chosen = topk_candidates(scores, cand, guard)  # [Ly, H, N], each head's guarded best
    pool = (counts.sum(-1) - guard.sum(-1)).view(ly, 1)  # what each layer still keeps
    flat = topk_candidates(
        scores.reshape(ly, 1, h * n), (cand & ~chosen).reshape(ly, 1, h * n), pool
    )
    return chosen | flat.view(ly, h, n)


@attrs.define(kw_only=True)
class AdaKVSelector(Selector):
    """Per layer: every head's safeguard, then the best candidates of all heads pooled."""

    name: ClassVar[str] = "adakv"
    pools_heads: ClassVar[bool] = True
    scorer: str = "main"
    protected: str | None = None  # the scorer giving the protected slots (None: none counted)
    alpha_safeguard: float = attrs.field(
        default=0.20,
        validator=unit_interval(
            "the share of each KV head's kept count reserved for its own best tokens before the "
            "layer's budget is pooled across heads (Ada-KV's safeguard; 0 pools everything), "
            "e.g. alpha_safeguard=0.2"
        ),
    )

    def scorer_names(self) -> tuple[str, ...]:
        return (self.scorer,) if self.protected is None else (self.scorer, self.protected)

    @property
    def layer_local(self) -> bool:
        """A layer's choice reads that layer alone (the engine still compresses after the pass)."""
        return True

    def select(
        self, source: ScoreSource, candidates: torch.Tensor, k: int | torch.Tensor
    ) -> torch.Tensor:
        scores = source.scores(self.scorer, candidates)
        protected = None if self.protected is None else source.scores(self.protected, candidates)
        return adakv_select(
            scores,
            candidates,
            k,
            self.alpha_safeguard,
            None if protected is None else protected > 0,
        )


@attrs.define(kw_only=True)
class AdaKVPolicy(ReusesScoring, policy_with(Expose(AdaKVSelector, only=("alpha_safeguard",)))):
    """Ada-KV (Feng et al. 2024) over another policy's scores: head budgets pooled per layer.

    ``alpha_safeguard`` is the selector's. ``scorer`` names the registered policy whose budgeter
    and scorers are reused, with its own parameters after ``+``
    (``adakv:keep_ratio=0.25,scorer=snapkv+window=64+kernel=5+pooling=avg`` is kvpress's
    ``AdaKVPress(SnapKVPress(compression_ratio=0.75))``); its scores must be per KV head for the
    pooling to mean anything.
    """

    name: ClassVar[str] = "adakv"
    scorer: str = "snapkv"  # checked by reuse_scoring when the policy is built

    def compose(self) -> Composition:
        reused = self.reused_scoring()
        selector = self.build(AdaKVSelector, scorer=reused.scorer, protected=PROTECTED)
        return reused.compose(selector, {PROTECTED: ProtectedSlotsScorer(budgeter=reused.budgeter)})


@hookimpl
def kvlab_selectors() -> list[type]:
    return [AdaKVSelector]


@hookimpl
def kvlab_policies() -> list[type]:
    return [AdaKVPolicy]
