"""A KV cache in which every layer and every KV head keeps its own number of tokens.

Head-wise budgets (AdaKV, Feng et al. 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive
Budget Allocation for Efficient LLM Inference"; PyramidKV, Cai et al. 2024, per-layer budgets)
give each head its own count of kept tokens. kvpress realises them by masking: the evicted keys
stay allocated and are hidden from attention, so memory does not shrink. Storing one cache per
*query* head (as KVCache-Factory does) wastes ``n_heads / n_kv_heads`` times the memory under
grouped-query attention. This module stores each layer's kept tokens *packed*, per KV head, with
no padding to the longest head:

* a **body**: keys and values of all heads back to back, ``[sum_h L_h, head_dim]``, with the
  per-head lengths ``L_h``, their offsets and each token's original position alongside. The body
  is built once (from a dense cache and per-head kept indices) and never written in place.
* a **tail**: tokens appended after the build (the question, then one token per decode step).
  Every head receives the same new tokens, so the tail is dense, ``[n_kv_heads, capacity,
  head_dim]``; it grows by doubling its capacity, so a decode step writes one row per head in
  place and the packed body is never copied (amortised O(1) appends, one copy of the small tail
  per doubling). :meth:`RaggedLayer.compact` folds the tail into the body when exact memory
  matters (for example before compressing again).

:attr:`RaggedCache.kv_bytes` reports the bytes actually allocated, read from the tensors'
storages. Attention over this layout is in :mod:`kvpress_lab.adapters.ragged_attention`; only
batch size 1 (what the engine runs) is supported.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvpress_lab.errors import ConfigError

__all__ = ["RaggedCache", "RaggedLayer", "RaggedView", "ragged_from_dense"]

_MIN_TAIL_CAPACITY = 16


@attrs.frozen
class RaggedView:
    """What a ragged layer hands the attention function in place of dense key/value tensors.

    ``body`` is ``[sum_h L_h, head_dim]`` (keys or values, heads back to back); head ``h`` owns
    rows ``offsets[h] : offsets[h] + lengths[h]``. ``tail`` is ``[n_kv_heads, t, head_dim]``: the
    ``t`` tokens appended since the build, the last ones being the current forward pass's.
    """

    body: torch.Tensor
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    tail: torch.Tensor
    #: ``[n_kv_heads, 1, sum_h L_h]``, 0 where a body row is the head's own, -inf where another's
    foreign_bias: torch.Tensor | None = None

    @property
    def n_heads(self) -> int:
        return len(self.lengths)

    def head(self, h: int) -> torch.Tensor:
        """Head ``h``'s body rows, a view (no copy)."""
        start = self.offsets[h]
        return self.body[start : start + self.lengths[h]]


def _offsets(lengths: Sequence[int]) -> tuple[int, ...]:
    out, acc = [], 0
    for n in lengths:
        out.append(acc)
        acc += n
    return tuple(out)


def _storage_bytes(*tensors: torch.Tensor | None) -> int:
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


class RaggedLayer(CacheLayerMixin):
    """One decoder layer's ragged KV: a packed per-head body plus a dense, growing tail."""

    is_sliding = False
    is_compileable = False

    def __init__(
        self,
        body_keys: torch.Tensor,
        body_values: torch.Tensor,
        lengths: Sequence[int],
        positions: torch.Tensor,
    ) -> None:
        super().__init__()
        lengths = tuple(int(n) for n in lengths)
        total = sum(lengths)
        if body_keys.dim() != 2 or body_keys.shape[0] != total:
            raise ConfigError(
                f"ragged body keys have shape {tuple(body_keys.shape)}, expected "
                f"[sum of per-head lengths = {total}, head_dim]"
            )
        if body_values.shape[0] != total or positions.shape != (total,):
            raise ConfigError(
                f"ragged body values {tuple(body_values.shape)} / positions "
                f"{tuple(positions.shape)} do not hold {total} rows (the per-head lengths' sum)"
            )
        self.body_keys = body_keys
        self.body_values = body_values
        self.lengths = lengths
        self.offsets = _offsets(lengths)
        self.positions = positions  # original position of every body token (int64, metadata)
        self.tail_keys: torch.Tensor | None = None
        self.tail_values: torch.Tensor | None = None
        self.tail_positions: torch.Tensor | None = None
        self.tail_len = 0
        self.device = body_keys.device
        self.is_initialized = True
        self._foreign: torch.Tensor | None = None

    def foreign_bias(self) -> torch.Tensor:
        """``[n_kv_heads, 1, sum_h L_h]`` additive mask: 0 on a head's own body rows, -inf else.

        Built once per body (the body is never written in place) and shared by copies.
        """
        if self._foreign is None:
            owner = torch.repeat_interleave(
                torch.arange(self.n_heads, device=self.device),
                torch.tensor(self.lengths, device=self.device),
            )
            heads = torch.arange(self.n_heads, device=self.device)[:, None, None]
            bias = torch.zeros(owner.shape, dtype=self.body_keys.dtype, device=self.device)
            self._foreign = bias.expand(self.n_heads, 1, -1).masked_fill(
                owner[None, None, :] != heads, float("-inf")
            )
        return self._foreign

    # ------------------------------------------------------------------ sizes
    @property
    def n_heads(self) -> int:
        return len(self.lengths)

    def head_lengths(self) -> list[int]:
        """Tokens held by each KV head (body + tail)."""
        return [n + self.tail_len for n in self.lengths]

    def tail_capacity(self) -> int:
        return 0 if self.tail_keys is None else int(self.tail_keys.shape[1])

    def kv_bytes(self) -> int:
        """Bytes allocated for this layer's keys and values, read from the storages."""
        return _storage_bytes(self.body_keys, self.body_values, self.tail_keys, self.tail_values)

    def head_positions(self, h: int) -> torch.Tensor:
        """Original positions of head ``h``'s tokens, in cache order."""
        start = self.offsets[h]
        body = self.positions[start : start + self.lengths[h]]
        if not self.tail_len:
            return body
        return torch.cat([body, self.tail_positions[: self.tail_len]])

    def head_kv(self, h: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of head ``h``, ``[L_h, head_dim]`` each (a copy when a tail exists)."""
        start, n = self.offsets[h], self.lengths[h]
        k, v = self.body_keys[start : start + n], self.body_values[start : start + n]
        if not self.tail_len:
            return k, v
        t = self.tail_len
        return torch.cat([k, self.tail_keys[h, :t]]), torch.cat([v, self.tail_values[h, :t]])

    # ------------------------------------------------------------------ appending
    def _grow(self, needed: int, like_k: torch.Tensor, like_v: torch.Tensor) -> None:
        capacity = max(_MIN_TAIL_CAPACITY, self.tail_capacity())
        while capacity < needed:
            capacity *= 2
        h = self.n_heads
        keys = like_k.new_empty(h, capacity, like_k.shape[-1])
        values = like_v.new_empty(h, capacity, like_v.shape[-1])
        positions = torch.empty(capacity, dtype=torch.long, device=like_k.device)
        if self.tail_len:
            t = self.tail_len
            keys[:, :t] = self.tail_keys[:, :t]
            values[:, :t] = self.tail_values[:, :t]
            positions[:t] = self.tail_positions[:t]
        self.tail_keys, self.tail_values, self.tail_positions = keys, values, positions

    def append(
        self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor | None = None
    ) -> None:
        """Append ``n`` new tokens to every head: ``keys``/``values`` ``[1, n_kv_heads, n, d]``."""
        if keys.dim() != 4 or keys.shape[0] != 1:
            raise ConfigError(
                f"the ragged cache holds one sequence (batch size 1); got keys of shape "
                f"{tuple(keys.shape)}. Run one prompt at a time"
            )
        if keys.shape[1] != self.n_heads:
            raise ConfigError(
                f"new keys have {keys.shape[1]} KV heads but this ragged layer holds {self.n_heads}"
            )
        n = keys.shape[2]
        end = self.tail_len + n
        if end > self.tail_capacity():
            self._grow(end, keys, values)
        self.tail_keys[:, self.tail_len : end] = keys[0]
        self.tail_values[:, self.tail_len : end] = values[0]
        if positions is None:
            last = self._max_position()
            positions = torch.arange(last + 1, last + 1 + n, device=keys.device)
        self.tail_positions[self.tail_len : end] = positions.to(self.tail_positions.device)
        self.tail_len = end

    def _max_position(self) -> int:
        if self.tail_len:
            return int(self.tail_positions[self.tail_len - 1])
        return int(self.positions.max()) if self.positions.numel() else -1

    def view(self) -> tuple[RaggedView, RaggedView]:
        t = self.tail_len
        if self.tail_keys is None:
            d_k, d_v = self.body_keys.shape[-1], self.body_values.shape[-1]
            empty_k = self.body_keys.new_empty(self.n_heads, 0, d_k)
            empty_v = self.body_values.new_empty(self.n_heads, 0, d_v)
        else:
            empty_k, empty_v = self.tail_keys[:, :t], self.tail_values[:, :t]
        foreign = self.foreign_bias()
        return (
            RaggedView(self.body_keys, self.offsets, self.lengths, empty_k, foreign),
            RaggedView(self.body_values, self.offsets, self.lengths, empty_v, foreign),
        )

    def compact(self) -> None:
        """Fold the tail into the packed body (one copy); afterwards no spare capacity is held."""
        if self.tail_keys is None:
            return
        t = self.tail_len
        ks, vs, ps = [], [], []
        for h in range(self.n_heads):
            start, n = self.offsets[h], self.lengths[h]
            ks += [self.body_keys[start : start + n], self.tail_keys[h, :t]]
            vs += [self.body_values[start : start + n], self.tail_values[h, :t]]
            ps += [self.positions[start : start + n], self.tail_positions[:t]]
        self.body_keys, self.body_values = torch.cat(ks), torch.cat(vs)
        self.positions = torch.cat(ps)
        self.lengths = tuple(n + t for n in self.lengths)
        self.offsets = _offsets(self.lengths)
        self._foreign = None
        self.tail_keys = self.tail_values = self.tail_positions = None
        self.tail_len = 0

    def clone_for_copy(self) -> RaggedLayer:
        """A layer sharing the (never written) body and owning a copy of the tail."""
        new = RaggedLayer(self.body_keys, self.body_values, self.lengths, self.positions)
        new._foreign = self._foreign
        if self.tail_keys is not None:
            new.tail_keys = self.tail_keys.clone()
            new.tail_values = self.tail_values.clone()
            new.tail_positions = self.tail_positions.clone()
            new.tail_len = self.tail_len
        return new

    # ------------------------------------------------------------------ transformers API
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None  # built eagerly from a dense cache

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[RaggedView, RaggedView]:
        self.append(key_states, value_states)
        return self.view()

    def get_seq_length(self) -> int:
        """The longest head's token count (heads differ; see :meth:`head_lengths`)."""
        return max(self.head_lengths(), default=0)

    def get_mask_sizes(self, query: Any) -> tuple[int, int]:
        # 5.2 passes cache_position (a tensor), later releases the query length (an int)
        n = int(query.shape[0]) if isinstance(query, torch.Tensor) else int(query)
        return self.get_seq_length() + n, 0

    def get_max_cache_shape(self) -> int:
        return -1

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        raise ConfigError("a ragged cache cannot be reset; build a new one")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise ConfigError("a ragged cache holds one sequence; beam search is not supported")


class RaggedCache(Cache):
    """A transformers :class:`~transformers.cache_utils.Cache` of :class:`RaggedLayer` objects."""

    def __init__(self, layers: list[RaggedLayer]) -> None:
        super().__init__(layers=layers)
        self.next_positions: torch.Tensor | None = None

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[RaggedView, RaggedView]:
        """Append the pass's keys/values to every head of ``layer_idx``; return ragged views.

        The tokens' original positions are :attr:`next_positions` (set by the adapter before a
        forward pass); without them they continue after the layer's last position.
        """
        lay = self.layers[layer_idx]
        positions = self.next_positions
        if positions is not None and positions.numel() != key_states.shape[-2]:
            positions = None
        lay.append(key_states, value_states, positions)
        return lay.view()

    def head_lengths(self, layer: int) -> list[int]:
        return self.layers[layer].head_lengths()

    def layer_lengths(self) -> list[list[int]]:
        """Per layer, per KV head token counts."""
        return [lay.head_lengths() for lay in self.layers]

    def kv_bytes(self) -> int:
        """Bytes actually allocated for keys and values (storages summed, spare tail included)."""
        return sum(lay.kv_bytes() for lay in self.layers)

    def compact(self) -> None:
        for lay in self.layers:
            lay.compact()

    def copy(self) -> RaggedCache:
        """An independent cache: appending to one never changes the other."""
        return RaggedCache([lay.clone_for_copy() for lay in self.layers])


def ragged_from_dense(
    layer_kv: Sequence[tuple[torch.Tensor, torch.Tensor]],
    keep: Sequence[Sequence[torch.Tensor]],
    positions: torch.Tensor | None = None,
) -> RaggedCache:
    """Build a ragged cache from dense per-layer ``(keys, values)`` ``[1, H, N, d]``.

    ``keep[layer][head]`` is a 1-D index tensor of the slots head ``head`` of ``layer`` keeps (kept
    in the given order; pass them sorted to keep original order). ``positions`` ``[N]`` are the
    slots' original positions (default ``0..N-1``).
    """
    if len(keep) != len(layer_kv):
        raise ConfigError(
            f"keep lists cover {len(keep)} layers but the cache has {len(layer_kv)}; give one "
            "list of per-head indices per layer"
        )
    layers = []
    for li, ((keys, values), heads) in enumerate(zip(layer_kv, keep, strict=True)):
        if keys.dim() != 4 or keys.shape[0] != 1:
            raise ConfigError(
                f"layer {li}: dense keys of shape {tuple(keys.shape)}; the ragged cache holds "
                "one sequence ([1, n_kv_heads, N, head_dim])"
            )
        n_heads, n = keys.shape[1], keys.shape[2]
        if len(heads) != n_heads:
            raise ConfigError(
                f"layer {li}: {len(heads)} per-head index lists for {n_heads} KV heads; give "
                "one index tensor per KV head"
            )
        pos = torch.arange(n, device=keys.device) if positions is None else positions
        idx = [torch.as_tensor(ix, dtype=torch.long, device=keys.device) for ix in heads]
        for h, ix in enumerate(idx):
            if ix.numel() and (int(ix.min()) < 0 or int(ix.max()) >= n):
                raise ConfigError(
                    f"layer {li} head {h}: kept index {int(ix.max())} / {int(ix.min())} is "
                    f"outside the cache's {n} slots"
                )
        body_k = torch.cat([keys[0, h].index_select(0, ix) for h, ix in enumerate(idx)])
        body_v = torch.cat([values[0, h].index_select(0, ix) for h, ix in enumerate(idx)])
        body_pos = torch.cat([pos.to(keys.device).index_select(0, ix) for ix in idx])
        layers.append(RaggedLayer(body_k, body_v, [ix.numel() for ix in idx], body_pos))
    return RaggedCache(layers)
