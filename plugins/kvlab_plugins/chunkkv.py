"""ChunkKV: keep whole chunks of contiguous tokens, ranked by any scorer.

Liu et al., "ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context LLM
Inference", 2025 (arXiv:2502.00299). Single tokens kept here and there lose the phrase they belong
to; ChunkKV cuts the context into chunks of ``chunk_length`` consecutive tokens, scores every chunk
by its tokens' importance and keeps the best chunks whole.

Here the token importance comes from any registered policy (``scorer=snapkv``, ``knorm``, ``tova``,
``expected_attention``, a kvpress press through ``kvpress`` ...): that policy's budgeter and
scorers are reused through :func:`kvpress_lab.reuse.reuse_scoring` and only the selection changes.

Chunks and budgets:

* Chunk ``c`` holds context positions ``[c * chunk_length, (c + 1) * chunk_length)``; when the
  context length is not a multiple of ``chunk_length`` the last chunk is shorter (as in kvpress).
* A chunk's score is the mean score of its *candidate* tokens (slots the reused budgeter protects,
  e.g. SnapKV's observation window, are kept anyway and do not count). With ``granularity=layer``
  (the default, as in kvpress) scores are first summed over the KV heads, so all heads of a layer
  keep the same chunks.
* Chunks are taken best first while they fit the budget. The first chunk that does not fit is cut:
  its best-scored tokens fill the budget exactly. So the policy keeps exactly
  ``floor(keep_ratio * L)`` context tokens like every other policy, at the price of at most one
  partial chunk per selection.

kvpress's ``ChunkKVPress`` keeps ``max(1, int(n_chunks * keep_ratio))`` whole chunks instead, which
can miss the budget by up to a chunk; where the budget is a whole number of chunks and the
protected window is made of whole chunks, the two keep the same tokens (checked by a differential
test).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import attrs
import torch

from kvpress_lab.errors import PluginError
from kvpress_lab.hookspecs import hookimpl
from kvpress_lab.interfaces import Scorer, ScoreSource, Selector, StepLayout
from kvpress_lab.params import Expose, policy_with
from kvpress_lab.policy import Composition
from kvpress_lab.reuse import ReusesScoring
from kvpress_lab.selection import Granularity, reduce_scores
from kvpress_lab.validators import positive_int

POSITIONS = "context_position"
"""Scorer name under which a chunk selector reads the context position of every slot."""


@attrs.define(kw_only=True)
class ContextPositionScorer(Scorer):
    """The context position of every slot (question slots: -1), as long "scores" [Ly, H, N].

    Selectors that group tokens by where they sit in the context read it like any scorer.
    """

    name: ClassVar[str] = "context_position"
    layer_local: ClassVar[bool] = True  # a layer's scores read only that layer

    def score(
        self,
        layout: StepLayout,
        observed: Sequence[torch.Tensor | None],
        candidates: torch.Tensor,
        cache_keys: Callable[[int], torch.Tensor],
    ) -> torch.Tensor:
        return layout.context_index


def _collapse(x: torch.Tensor, lead: torch.Size, what: str) -> torch.Tensor:
    """Narrow the leading dims of ``x`` to 1 where ``lead`` has 1; they must all agree."""
    for dim in (0, 1):
        if lead[dim] == 1 and x.shape[dim] > 1:
            first = x.narrow(dim, 0, 1)
            if not bool((x == first).all()):
                raise PluginError(
                    f"chunk selection: the {what} differ between "
                    f"{'layers' if dim == 0 else 'heads'}, but the granularity gives one index "
                    "set for them; use a finer granularity"
                )
            x = first
    return x


def chunk_select(
    scores: torch.Tensor,
    positions: torch.Tensor,
    candidates: torch.Tensor,
    k: int,
    chunk_length: int,
) -> torch.Tensor:
    """Kept candidate slots: the best chunks whole, then the best tokens of the next chunk.

    Args:
        scores: [Ly', H', N] token scores (one row per index set to choose).
        positions: [Ly|1, H|1, N] context position of every slot, negative for question slots;
            context slots in increasing order (the engine keeps slots in context order).
        candidates: [Ly|1, H|1, N] bool.
        k: candidates to keep per row.
        chunk_length: tokens per chunk; chunk ``c`` is positions ``[c*len, (c+1)*len)``.
    Returns:
        [Ly', H', k] long, sorted ascending.
    """
    lead = scores.shape[:2]
    device = scores.device
    n = scores.shape[-1]
    pos = _collapse(positions.to(device), lead, "slot positions").expand(*lead, n)
    cand = _collapse(candidates.to(device, torch.bool), lead, "candidates").expand(*lead, n)
    if k == 0:
        return torch.empty(*lead, 0, dtype=torch.long, device=device)
    score = scores.float()
    # slots are in context order, so a chunk is a run of adjacent slots: number the runs densely
    # (at most N of them) instead of reading the largest position on the host
    chunk = torch.div(pos.long(), chunk_length, rounding_mode="floor")  # [a, b, N]
    starts = torch.ones_like(chunk, dtype=torch.bool)
    starts[..., 1:] = chunk[..., 1:] != chunk[..., :-1]
    chunk = starts.long().cumsum(dim=-1) - 1
    n_chunks = n
    zeros = torch.zeros(*lead, n_chunks, device=device)
    total = zeros.scatter_add(-1, chunk, torch.where(cand, score, 0.0))
    count = zeros.scatter_add(-1, chunk, cand.float())
    mean = torch.where(count > 0, total / count.clamp(min=1), float("-inf"))
    # rank chunks best first (ties: the earlier chunk), then every slot inherits its chunk's rank
    order = mean.sort(dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(n_chunks, device=device).expand_as(order)
    )
    slot_rank = torch.where(cand, rank.gather(-1, chunk), n_chunks)
    # one stable sort on (chunk rank, token score descending): the first k slots are the whole
    # best chunks and the best tokens of the first chunk that does not fit (ties: earlier slot).
    # A float32 score maps to an int32 with the same order (negatives: flip the magnitude bits;
    # + 0.0 turns -0.0 into 0.0, which compare equal), so both keys fit one int64.
    token = torch.where(cand, score, float("-inf")) + 0.0
    bits = token.view(torch.int32)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()
    key = slot_rank.long() * (1 << 33) + ((1 << 31) - bits)
    best = key.sort(dim=-1, stable=True).indices[..., :k]
    kept = torch.zeros_like(cand).scatter_(-1, best, True)
    # the kept slots in slot order, without a host read of their count or another sort
    target = torch.where(kept, kept.long().cumsum(dim=-1) - 1, k)
    slots = torch.arange(n, device=device).expand(*lead, n)
    out = torch.zeros(*lead, k + 1, dtype=torch.long, device=device)
    return out.scatter_(-1, target, slots)[..., :k]


@attrs.define(kw_only=True)
class ChunkSelector(Selector):
    """Whole chunks of contiguous context tokens, best mean score first, exactly ``k`` tokens."""

    name: ClassVar[str] = "chunk"
    scorer: str = "main"
    positions: str = POSITIONS
    chunk_length: int = attrs.field(default=20, validator=positive_int)
    granularity: Granularity = attrs.field(
        default="layer", validator=attrs.validators.in_(("global", "layer", "head"))
    )

    def scorer_names(self) -> tuple[str, ...]:
        return (self.scorer, self.positions)

    @property
    def layer_local(self) -> bool:
        """Per-layer and per-head selections decide each layer alone; a global one does not."""
        return self.granularity != "global"

    def select(self, source: ScoreSource, candidates: torch.Tensor, k: int) -> torch.Tensor:
        scores = reduce_scores(source.scores(self.scorer, candidates), self.granularity)
        positions = source.scores(self.positions, candidates)
        return chunk_select(scores, positions, candidates, k, self.chunk_length)


@attrs.define(kw_only=True)
class ChunkKVPolicy(
    ReusesScoring, policy_with(Expose(ChunkSelector, only=("chunk_length", "granularity")))
):
    """ChunkKV: another policy's scores, kept in whole chunks of ``chunk_length`` tokens.

    ``chunk_length`` and ``granularity`` are the chunk selector's. ``scorer`` names the registered
    policy whose budgeter and scorers are reused, with its own parameters after ``+``
    (``scorer=snapkv+window=64+kernel=5+pooling=avg``); the selector's own ``scorer`` field (the
    score name it reads) is set from the reused policy.
    """

    name: ClassVar[str] = "chunkkv"
    scorer: str = "snapkv"  # checked by reuse_scoring when the policy is built

    def compose(self) -> Composition:
        reused = self.reused_scoring()
        selector = self.build(ChunkSelector, scorer=reused.scorer)
        return reused.compose(selector, {POSITIONS: ContextPositionScorer()})


@hookimpl
def kvlab_scorers() -> list[type]:
    return [ContextPositionScorer]


@hookimpl
def kvlab_selectors() -> list[type]:
    return [ChunkSelector]


@hookimpl
def kvlab_policies() -> list[type]:
    return [ChunkKVPolicy]
