"""Attention over a :class:`~kvpress_lab.adapters.ragged_cache.RaggedCache`.

Each query head attends to its own KV head's keys only: the packed body rows of that head (the
tokens a head-wise policy such as AdaKV, Feng et al. 2024, kept for it) followed by the dense tail
(tokens appended since compression, the last ``r`` of which are the current pass's own rows and
are causally masked among themselves). The function is registered through transformers' public
``AttentionInterface`` under :data:`ATTENTION_NAME`, on demand, the first time a ragged cache is
used, and a model is switched to it only for the duration of a forward pass over a ragged cache
(:func:`ragged_attention_for`). An implementation name that transformers has no mask function for
makes it skip mask construction, which this function does not need.

The CPU path loops over KV heads and reads the body through views (no padding, no copy of the
cache per step); only the ``G x r x (L_h + t)`` logits of one head exist at a time. Logits are
scaled, soft-capped where the layer caps them (Gemma 2) and normalised in float32, as the eager
implementation does. Sliding-window layers are exact only while the run spans no more than the
window, so longer spans are refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from kvpress_lab.adapters.ragged_cache import RaggedView
from kvpress_lab.errors import ConfigError

__all__ = ["ATTENTION_NAME", "ragged_attention_for", "ragged_attention_forward", "register"]

ATTENTION_NAME = "kvlab_ragged"
_registered = False


def ragged_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: Any,
    value: Any,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of ``query`` ``[1, H_q, r, d]`` over ragged keys/values; ``[1, r, H_q, d_v]``."""
    if not isinstance(key, RaggedView) or not isinstance(value, RaggedView):
        raise ConfigError(
            f"attention implementation {ATTENTION_NAME!r} reads a ragged cache, but layer "
            f"{getattr(module, 'layer_idx', '?')} received dense keys; pass a RaggedCache "
            "(ModelAdapter.ragged_cache) or use another attn_implementation"
        )
    if query.shape[0] != 1:
        raise ConfigError(f"ragged attention runs batch size 1; got {query.shape[0]} sequences")
    if dropout:
        raise ConfigError(
            "ragged attention is for inference; dropout must be 0 (call model.eval())"
        )
    _, hq, r, d = query.shape
    h_kv = key.n_heads
    g = hq // h_kv
    if scaling is None:
        scaling = d**-0.5
    t = key.tail.shape[1]
    if sliding_window is not None:
        span = max(key.lengths) + t  # every head's tokens, all visible to the last query
        _check_window(module, sliding_window, span)
    causal = None
    if r > 1:
        # the current rows are the tail's last r entries: row i sees tail entries up to t - r + i
        rows = torch.arange(r, device=query.device)[:, None]
        cols = torch.arange(t, device=query.device)[None, :]
        causal = cols > rows + (t - r)
    out = query.new_empty(1, r, hq, value.body.shape[-1])
    for h in range(h_kv):
        q = query[0, h * g : (h + 1) * g]  # [G, r, d]
        kb, vb = key.head(h), value.head(h)
        kt, vt = key.tail[h], value.tail[h]
        n_body = kb.shape[0]
        logits = torch.cat([q @ kb.transpose(0, 1), q @ kt.transpose(0, 1)], dim=-1) * scaling
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        if causal is not None:
            logits[..., n_body:] = logits[..., n_body:].masked_fill(causal, float("-inf"))
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)
        o = probs[..., :n_body] @ vb + probs[..., n_body:] @ vt  # [G, r, d_v]
        out[0, :, h * g : (h + 1) * g] = o.transpose(0, 1)
    return out, None


def _check_window(module: nn.Module, window: int, span: int) -> None:
    if span > window:
        raise ConfigError(
            f"layer {getattr(module, 'layer_idx', '?')} attends through a sliding window of "
            f"{window} tokens, but a ragged head holds {span}; a ragged cache over "
            "sliding-window layers is exact only within the window. Use a shorter run or a "
            "model without sliding-window attention"
        )


def register() -> None:
    """Register :func:`ragged_attention_forward` with transformers (once, on first use)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, ragged_attention_forward)
    _registered = True


@contextlib.contextmanager
def attention_implementation(config: Any, name: str) -> Iterator[None]:
    """Switch ``config``'s attention implementation to ``name`` for the block, then restore it."""
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


def ragged_attention_for(config: Any) -> contextlib.AbstractContextManager[None]:
    """Context in which the model with ``config`` attends over ragged caches."""
    register()
    return attention_implementation(config, ATTENTION_NAME)
