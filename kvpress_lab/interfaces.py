"""The three plugin kinds (scorer, selector, budgeter) and the data the engine hands them.

The engine runs the model over the context (in one block, or block by block) and, after every
forward pass, performs one *compression step*. A step's cache holds ``N`` slots per layer and KV
head. The budgeter decides which slots are protected and which are candidates and how many
candidates survive; scorers score slots; the selector picks the surviving candidates. The engine
then keeps ``protected | selected`` and drops everything else, including the question.

Shapes use ``Ly`` for layers and ``H`` for KV heads; any of the two leading dims may be 1, meaning
"the same for every layer / head". Selection granularity follows from the shapes: ``[1, 1, k]``
is one index set for the whole model, ``[Ly, 1, k]`` one per layer, ``[Ly, H, k]`` one per head.
"""

from __future__ import annotations

import contextlib
import contextvars
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
import torch

if TYPE_CHECKING:
    from kvpress_lab.adapters import ModelAdapter

__all__ = [
    "ATTENTION_CHUNK_ELEMENTS",
    "Allocation",
    "AttentionBlock",
    "Budgeter",
    "KVCacheView",
    "LayerObservation",
    "Probe",
    "ScoreSource",
    "Scorer",
    "Selector",
    "StepLayout",
    "attention_chunk",
    "attention_chunk_elements",
]


@attrs.frozen
class StepLayout:
    """Where every cache slot of one compression step comes from.

    ``context_index[l, h, i]`` is the context position held by slot ``i`` of layer ``l`` and KV
    head ``h``; question slots hold ``-1``. Slots ``[0, n_past)`` were carried over from earlier
    steps, slots ``[n_past, n_past + block_end - block_start)`` are the current block, and the
    question (if visible) occupies the last ``n_question`` slots.
    """

    context_length: int
    block_index: int
    n_blocks: int
    block_start: int
    block_end: int
    n_past: int
    n_question: int
    context_index: torch.Tensor  # [Ly, H, N] long, -1 for question slots
    # the model layer of context_index's first row: 0, except when the engine decides one layer
    # at a time inside the forward pass (layer-local plugins, see Scorer.layer_local)
    first_layer: int = 0

    @property
    def n_slots(self) -> int:
        return int(self.context_index.shape[-1])

    @property
    def is_last_block(self) -> bool:
        return self.block_index == self.n_blocks - 1

    @property
    def question_mask(self) -> torch.Tensor:
        """[Ly, H, N] True on question slots."""
        return self.context_index < 0

    @property
    def block_mask(self) -> torch.Tensor:
        """[Ly, H, N] True on the current block's slots."""
        ci = self.context_index
        return (ci >= self.block_start) & (ci < self.block_end)

    @property
    def past_mask(self) -> torch.Tensor:
        """[Ly, H, N] True on slots carried over from earlier steps."""
        slots = torch.arange(self.n_slots, device=self.context_index.device)
        return (slots < self.n_past).expand_as(self.context_index)


@attrs.frozen
class Allocation:
    """A budgeter's decision for one step.

    ``protected`` slots are always kept; ``k`` of the ``candidates`` are kept by the selector;
    every other slot is dropped. Masks broadcast to ``[Ly, H, N]``.

    ``k`` is either an int, the same count in every layer and KV head (the cache stays a dense
    tensor when the protected counts agree too), or a long tensor ``[Ly|1, H|1]`` of per-layer
    (``[Ly, 1]``, PyramidKV, Cai et al. 2024) or per-(layer, head) counts, each at most its row's
    candidates. Protected sets may hold different numbers of slots in different rows. When the
    kept counts (protected + selected) differ between rows, the engine stores the compressed
    cache ragged (each KV head packs its own tokens); that is supported for one-shot compression
    with original positions only (see the plugin-authoring guide, "Allocation shape").
    """

    protected: torch.Tensor
    candidates: torch.Tensor
    k: int | torch.Tensor

    @classmethod
    def keep_all(cls, layout: StepLayout) -> Allocation:
        """Keep every context slot (drop only the question)."""
        ctx = ~layout.question_mask
        return cls(protected=ctx, candidates=torch.zeros_like(ctx), k=0)

    @property
    def per_row(self) -> bool:
        """Whether ``k`` is a tensor of per-layer / per-head counts (not one int)."""
        return isinstance(self.k, torch.Tensor)

    @property
    def selects(self) -> bool:
        """Whether the selector keeps any candidate in some row (host read for a tensor ``k``)."""
        if isinstance(self.k, torch.Tensor):
            return bool((self.k > 0).any())
        return self.k > 0

    def counts(self, layout: StepLayout) -> torch.Tensor:
        """Candidates kept per layer and KV head: long ``[Ly, H]`` on the host (``k`` broadcast)."""
        shape = tuple(layout.context_index.shape[:2])
        if isinstance(self.k, torch.Tensor):
            return self.k.to(device="cpu", dtype=torch.long).expand(shape)
        return torch.full(shape, int(self.k), dtype=torch.long)

    def kept_counts(self, layout: StepLayout) -> torch.Tensor:
        """Slots kept per layer and KV head, protected + ``k``: long ``[Ly, H]`` on the host."""
        protected = self.protected.to(device="cpu", dtype=torch.bool)
        protected = protected.expand_as(layout.context_index).sum(-1)
        return protected + self.counts(layout)


@attrs.frozen
class Probe:
    """Tokens a scorer asks the engine to run over the cache after a step's forward pass.

    Some methods score the cache by what extra queries do with it (KVzip feeds a "repeat the
    context" prompt). The engine sets the question's KV aside, feeds ``ids`` right after the
    cached context, lets the scorer observe every layer (:attr:`LayerObservation.probe` is this
    probe), then drops the probe's KV and puts the question back: the cache is unchanged. ``span``
    means what the scorer says it means (KVzip: the slots the probe reconstructs). Its wall time
    is reported as compression time.
    """

    ids: torch.Tensor  # [n] long
    span: tuple[int, int] = (0, 0)


ATTENTION_CHUNK_ELEMENTS = 1 << 24
"""Default bound on the attention weights a scorer forms at once: 2**24 float32 (64 MiB).

:meth:`LayerObservation.attention_blocks` never forms more than this many weights in one block
(the logits and their softmax are two such tensors, plus a boolean causal mask of one row block),
whatever the number of rows, heads and keys: at 128k keys and 32 query heads, H2O's 256-row
blocks would otherwise need 4 GiB each. Change it for a region of code with
:func:`attention_chunk`.
"""

_ATTENTION_CHUNK: contextvars.ContextVar[int] = contextvars.ContextVar(
    "attention_chunk", default=ATTENTION_CHUNK_ELEMENTS
)


def attention_chunk_elements() -> int:
    """The bound :meth:`LayerObservation.attention_blocks` uses here (weights per block)."""
    return _ATTENTION_CHUNK.get()


@contextlib.contextmanager
def attention_chunk(elements: int) -> Iterator[None]:
    """Bound every attention block formed inside the ``with`` to ``elements`` float32 weights.

    ```python
    with attention_chunk(1 << 20):  # 4 MiB blocks
        run(lm, "h2o:keep_ratio=0.25", context, question)
    ```
    A block holds at least one row of one KV head's query group over its visible keys, so the
    bound is exceeded only when a single such row does not fit.
    """
    from kvpress_lab.errors import ConfigError

    if not isinstance(elements, int) or isinstance(elements, bool) or elements < 1:
        raise ConfigError(
            f"attention_chunk(elements={elements!r}) is invalid: it must be a positive integer "
            f"number of float32 attention weights per block (default {ATTENTION_CHUNK_ELEMENTS})"
        )
    token = _ATTENTION_CHUNK.set(elements)
    try:
        yield
    finally:
        _ATTENTION_CHUNK.reset(token)


@attrs.frozen
class AttentionBlock:
    """One block of softmax attention weights from :meth:`LayerObservation.attention_blocks`.

    ``weights`` [B, h, G, r, n] float32 are the weights of the pass rows ``rows`` (absolute row
    indices of the forward pass), KV heads ``heads`` (with their ``G`` query heads each) over the
    key slots ``keys`` (or, when the caller passed ``slots``, positions ``keys`` of that list).
    Softmax normalisation always runs over every key a row can see, so blocks can be summed into
    a full-size result. ``complete`` is True when this single block covers every requested row,
    head and key (a scorer may then reduce it exactly as it would the whole tensor).
    """

    rows: slice
    heads: slice
    keys: slice
    weights: torch.Tensor
    complete: bool


@attrs.frozen
class LayerObservation:
    """What a scorer sees of one attention layer during a forward pass.

    ``hidden`` is the attention layer's input (after its input norm) for the rows of this forward
    pass and ``positions`` their positions as the engine fed them. ``keys`` and ``values`` are the
    layer's cache after this pass (past slots first, then the new rows). Row ``r`` sits in slot
    ``n_past + r``. Model-specific arithmetic (query projection and norm, RoPE, scaling,
    soft-capping) is the adapter's: scorers call :meth:`projected_queries`, :meth:`queries` and
    :meth:`attention`.

    ``projection`` is the layer's query projection output [B, n_rows, out] as the model computed
    it in this forward pass, captured only for scorers that declare
    :attr:`Scorer.needs_projected_queries` and held only until this layer's observation is done;
    None otherwise (then queries are recomputed from ``hidden``). Read it through
    :meth:`projected_queries`, never directly: its layout is the family's (fused ``qkv_proj``
    for phi3, the query norm not yet applied).
    """

    layer_idx: int
    n_layers: int
    adapter: ModelAdapter
    hidden: torch.Tensor  # [B, n_rows, hidden_size]
    positions: torch.Tensor  # [n_rows] long
    keys: torch.Tensor  # [B, H, N, head_dim]
    n_past: int
    question_rows: slice | None  # rows holding the question, None when it is not visible
    observation_window: int  # rows to observe when no question is visible
    layout: StepLayout | None
    values: torch.Tensor | None = None  # [B, H, N, head_dim], the layer's cached values
    # set during a probe pass (Scorer.probes): the probe, and what this scorer returned for this
    # layer in the previous pass of the step (the forward pass or the previous probe)
    probe: Probe | None = None
    previous: torch.Tensor | None = None
    projection: torch.Tensor | None = None  # [B, n_rows, out], see the class docstring

    @property
    def n_rows(self) -> int:
        return int(self.hidden.shape[1])

    def observation_rows(self) -> slice:
        """The question's rows, or the trailing window of the block when no question is visible."""
        if self.question_rows is not None:
            return self.question_rows
        start = max(0, self.n_rows - self.observation_window)
        return slice(start, self.n_rows)

    def projected_queries(self, rows: slice) -> torch.Tensor:
        """This layer's queries for ``rows`` before RoPE: [B, H_q, r, head_dim].

        Projected and normalised as the family does (what ``adapter.project_queries`` returns).
        When the engine captured the pass's own projection (:attr:`projection`, for scorers that
        declare :attr:`Scorer.needs_projected_queries`) they are read from it, so the query
        projection is not run a second time; otherwise they are recomputed from ``hidden``
        (generation-time compression, probe passes, an adapter that cannot capture them).
        """
        if self.projection is not None:
            return self.adapter.queries_from_projection(self.layer_idx, self.projection[:, rows])
        return self.adapter.project_queries(self.layer_idx, self.hidden[:, rows])

    def queries(self, rows: slice) -> torch.Tensor:
        """This layer's queries for ``rows``: [B, H_q, r, head_dim], RoPE applied.

        :meth:`projected_queries` rotated at the rows' positions (recomputed from ``hidden`` by
        ``adapter.queries`` when no projection was captured). Forming queries from the layer
        input means no attention-weight tensor is ever needed, so scoring works under SDPA and
        FlashAttention alike.
        """
        positions = self.positions[rows]
        if self.projection is None:
            return self.adapter.queries(self.layer_idx, self.hidden[:, rows], positions)
        q = self.projected_queries(rows)
        return self.adapter.rotate_queries(self.layer_idx, q, positions)

    def attention(self, rows: slice, causal: bool = True) -> torch.Tensor:
        """Softmax attention of ``rows`` over every key they can see, float32.

        Returns [B, H, G, r, N] with ``G`` query heads per KV head; keys are broadcast, never
        copied per query head. Slots after a row (later rows of this pass) get zero weight.
        Scaling and logit soft-capping are the model's own.
        """
        logits = self.adapter.attention_logits(self.layer_idx, self.queries(rows), self.keys)
        if causal:
            n = self.keys.shape[2]
            row_slot = self.n_past + torch.arange(rows.start, rows.stop, device=logits.device)
            visible = torch.arange(n, device=logits.device)[None, :] <= row_slot[:, None]
            logits = logits.masked_fill(~visible, float("-inf"))
        return torch.softmax(logits, dim=-1)

    def attention_blocks(
        self,
        rows: slice,
        causal: bool = True,
        slots: torch.Tensor | None = None,
        max_rows: int | None = None,
    ) -> Iterator[AttentionBlock]:
        """:meth:`attention` of ``rows`` in memory-bounded blocks (row chunks x KV-head chunks).

        Every block holds at most :func:`attention_chunk_elements` weights (default
        :data:`ATTENTION_CHUNK_ELEMENTS`) and at most ``max_rows`` rows; row chunks are as long
        as the bound allows, then as many KV heads as fit are taken together. Causal blocks
        (``slots`` None) stop at the last slot their last row can see, so the keys after it are
        never multiplied. Scorers reduce each block into an ``[H, N]``-sized result: nothing of
        size rows x keys x heads ever exists at once. When everything fits in one block, that
        block equals :meth:`attention` exactly (``complete`` is True).
        """
        n_rows = rows.stop - rows.start
        b, h, n, _ = self.keys.shape
        n_keys = n if slots is None else int(slots.shape[0])
        if n_rows <= 0 or n_keys == 0:
            return
        queries = self.queries(rows)
        g = queries.shape[1] // h
        limit = attention_chunk_elements()
        per_row = b * g * n_keys  # weights of one row of one KV head's group
        row_step = max(1, min(n_rows, limit // per_row, max_rows or n_rows))
        head_step = max(1, min(h, limit // (per_row * row_step)))
        complete = row_step == n_rows and head_step == h
        for h0 in range(0, h, head_step):
            h1 = min(h, h0 + head_step)
            keys = self.keys[:, h0:h1]
            if slots is not None:
                keys = keys.index_select(2, slots)
            keys = keys.float()  # once per head chunk, not once per row block
            for r0 in range(rows.start, rows.stop, row_step):
                r1 = min(rows.stop, r0 + row_step)
                # causal: the block's last row sees slots up to n_past + r1 - 1 (inclusive)
                visible = min(n_keys, self.n_past + r1) if causal and slots is None else n_keys
                q = queries[:, h0 * g : h1 * g, r0 - rows.start : r1 - rows.start]
                logits = self.adapter.attention_logits(self.layer_idx, q, keys[:, :, :visible])
                if causal:
                    row_slot = self.n_past + torch.arange(r0, r1, device=logits.device)
                    if slots is None:
                        # every row sees the slots before the block's first row: only the
                        # block's own r x r square can hold hidden entries
                        first = self.n_past + r0
                        key_slot = torch.arange(first, visible, device=logits.device)
                        hidden = key_slot[None, :] > row_slot[:, None]
                        logits[..., first:visible].masked_fill_(hidden, float("-inf"))
                    else:
                        hidden = slots.to(logits.device)[None, :] > row_slot[:, None]
                        logits.masked_fill_(hidden, float("-inf"))
                yield AttentionBlock(
                    rows=slice(r0, r1),
                    heads=slice(h0, h1),
                    keys=slice(0, visible),
                    weights=torch.softmax(logits, dim=-1),
                    complete=complete and visible == n_keys,
                )
                del logits


class KVCacheView:
    """The compressed cache as decode-time plugins see it: per-layer lengths and in-place eviction.

    Created by the engine around its cache; plugins never touch cache internals.
    """

    def __init__(self, adapter: ModelAdapter, cache: object) -> None:
        self._adapter, self._cache = adapter, cache

    @property
    def n_layers(self) -> int:
        return self._adapter.n_layers

    def length(self, layer: int) -> int:
        """Slots held by ``layer`` (per KV head)."""
        return self._adapter.cache_length(self._cache, layer)

    def keep(self, layer: int, indices: torch.Tensor) -> None:
        """Keep only slots ``indices`` ([H|1, k], sorted) of ``layer``; drop the rest."""
        keys, values = self._adapter.layer_kv(self._cache, layer)
        self._adapter.set_layer_kv(
            self._cache, layer, take_slots(keys, indices), take_slots(values, indices)
        )


def take_slots(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x: [B, H, N, D]; idx: [H|1, k] slot indices -> [B, H, k, D]."""
    idx = idx.to(x.device)
    if idx.shape[0] == 1:
        return x.index_select(2, idx[0])
    b, h, _, d = x.shape
    return x.gather(2, idx[None, :, :, None].expand(b, h, idx.shape[-1], d))


class ScoreSource(ABC):
    """Lazily computed scores, handed to selectors by the engine."""

    @abstractmethod
    def scores(self, name: str, candidates: torch.Tensor) -> torch.Tensor:
        """Scores of scorer ``name`` over all slots, [Ly|1, H|1, N]; only ``candidates`` matter."""


class Scorer(ABC):
    """Gives every candidate slot a score; higher means more worth keeping.

    ``observe`` runs inside the forward pass once per layer and may return a per-layer statistic
    (kept by the engine, small: at most [H, N]). ``score`` runs after the pass with those
    statistics and returns scores over all slots, [Ly|1, H|1, N].
    """

    name: ClassVar[str]

    needs_projected_queries: ClassVar[bool] = False
    """Whether :meth:`observe` reads the queries of many rows (declared by the scorer).

    When True the engine captures each layer's query projection output in the forward pass
    (:attr:`LayerObservation.projection`) so :meth:`LayerObservation.projected_queries` and
    :meth:`LayerObservation.queries` do not project the rows again; it holds that output only
    until the layer's observation is done. Worth it for scorers that read every row (Expected
    Attention's query statistics); scorers reading a few rows leave it False and pay nothing.
    """

    layer_local: ClassVar[bool] = False
    """Whether a layer's scores depend on that layer alone (declared by the scorer, default no).

    A layer-local scorer promises: calling :meth:`score` with a one-layer layout
    (``context_index[l:l+1]``), candidates ``[1, H|1, N]``, ``observed == [observed[l]]`` and
    ``cache_keys(0)`` returning layer ``l``'s keys gives row ``l`` of the full scores, and it asks
    for no probe passes. The engine may then compress each layer inside the prefill forward, as
    soon as that layer's attention has run (SnapKV, H2O, TOVA and most one-shot scorers); scores
    that need every layer first (a consensus across layers) must leave this False.
    """

    def observe(self, obs: LayerObservation) -> torch.Tensor | None:
        return None

    @abstractmethod
    def score(
        self,
        layout: StepLayout,
        observed: Sequence[torch.Tensor | None],
        candidates: torch.Tensor,
        cache_keys: Callable[[int], torch.Tensor],
    ) -> torch.Tensor:
        """Scores over all ``N`` slots. ``cache_keys(layer)`` returns that layer's keys."""

    @property
    def needs_observation(self) -> bool:
        """Whether ``observe`` must run; the engine skips the hooks otherwise."""
        return type(self).observe is not Scorer.observe

    def probes(
        self, layout: StepLayout, context_ids: torch.Tensor, tokenizer: Any
    ) -> Sequence[Probe]:
        """Extra passes the engine runs over the cache before this step's scores (none by default).

        Called only when the step evicts. ``context_ids`` [L] are the context tokens, ``tokenizer``
        the model's. Each probe's observations reach :meth:`observe` with ``obs.probe`` set and
        ``obs.previous`` holding the layer's value from the pass before; the value returned for
        the last probe is what :meth:`score` receives.
        """
        return ()


class Selector(ABC):
    """Turns scores, candidates and a budget into the kept candidate slots."""

    name: ClassVar[str]

    pools_heads: ClassVar[bool] = False
    """Whether the selector redistributes each layer's budget among that layer's KV heads.

    False (the default): every (layer, head) row must select exactly its count of the
    allocation's ``k``. True (Ada-KV, Feng et al. 2024): the engine checks only that each layer
    selects the sum of its heads' counts, so heads may keep different numbers of tokens (the
    cache then becomes ragged; one-shot compression with original positions only).
    """

    @abstractmethod
    def select(
        self, source: ScoreSource, candidates: torch.Tensor, k: int | torch.Tensor
    ) -> torch.Tensor:
        """Kept candidate slots of every row.

        ``k`` is the allocation's, as is: an int or a long ``[Ly|1, H|1]`` tensor of counts.
        Return either long indices ``[Ly|1, H|1, k]`` (only when every row keeps the same count)
        or a bool mask ``[Ly|1, H|1, N]`` of the selected slots (each True a candidate), which may
        select a different count in each row.
        """

    def scorer_names(self) -> Sequence[str]:
        """Names of the scorers this selector reads (keys of the policy's scorer mapping)."""
        return ()

    @property
    def layer_local(self) -> bool:
        """Whether a layer's kept slots depend on that layer's scores and candidates alone.

        True lets the engine call :meth:`select` one layer at a time (candidates and scores
        ``[1, H|1, N]``) during the prefill forward, when every scorer read is layer-local too.
        Per-layer and per-head selections are; one index set for the whole model is not. The
        default, False, keeps the compress-after-prefill path.
        """
        return False


class Budgeter(ABC):
    """Turns context length and settings into budgets and protected sets."""

    name: ClassVar[str]

    def validate(self, context_length: int) -> None:  # noqa: B027 - optional hook
        """Raise :class:`~kvpress_lab.errors.ConfigError` for impossible settings, before any model work."""

    @abstractmethod
    def target_tokens(self, context_length: int) -> int:
        """Context tokens the policy ends with, for fairness reports.

        The mean over layers and KV heads when an allocation gives them different counts: the
        total kept over layers and heads must equal this times ``layers x KV heads`` (1%).
        """

    @abstractmethod
    def allocate(self, layout: StepLayout) -> Allocation:
        """Which slots are protected, which are candidates, and how many candidates to keep."""


ScorerMap = Mapping[str, Scorer]
