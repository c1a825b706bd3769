"""Attention over a :class:`~kvpress_lab.adapters.ragged_cache.RaggedCache`.

Each query head attends to its own KV head's keys only: the packed body rows of that head (the
tokens a head-wise policy such as AdaKV, Feng et al. 2024, kept for it) followed by the dense tail
(tokens appended since compression, the last ``r`` of which are the current pass's own rows and
are causally masked among themselves). The function is registered through transformers' public
``AttentionInterface`` under :data:`ATTENTION_NAME`, on demand, the first time a ragged cache is
used, and a model is switched to it only for the duration of a forward pass over a ragged cache
(:func:`ragged_attention_for`). An implementation name that transformers has no mask function for
makes it skip mask construction, which this function does not need.

Large layers loop over KV heads and read each head's body rows through views (no padding, no
copy of the cache per step); the dense tail's logits are formed for all heads in one batched
product, and only the ``G x r x (L_h + t)`` logits of one head exist at a time. Small layers
(decode steps over short caches, up to :data:`BATCHED_MAX_PRODUCTS` multiply-adds) attend every
query head to the whole packed body in one product and mask other heads' rows: more arithmetic,
fewer kernel launches, which is what a decode step is bound by at that size. Logits are
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
#: Layers whose all-heads-against-whole-body product has at most this many multiply-adds
#: (n_kv_heads * G * r * sum_h L_h * d) attend in one batched pass; larger ones loop over heads.
BATCHED_MAX_PRODUCTS = 1 << 24


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
    qs = query[0].reshape(h_kv, g * r, d)  # the G query heads of KV head h are rows of qs[h]
    # the tail (tokens appended since the build) is dense: its logits for all heads at once
    tail = _capped(torch.matmul(qs, key.tail.transpose(1, 2)) * scaling, softcap)
    if r > 1:
        # the current rows are the tail's last r entries: row i sees tail entries up to t - r + i
        rows = torch.arange(r, device=query.device)[:, None]
        cols = torch.arange(t, device=query.device)[None, :]
        causal = cols > rows + (t - r)
        tail = tail.view(h_kv, g, r, t).masked_fill(causal, float("-inf")).view(h_kv, g * r, t)
    n_body = key.body.shape[0]
    if key.foreign_bias is not None and h_kv * g * r * n_body * d <= BATCHED_MAX_PRODUCTS:
        # a small layer (decode steps, short caches): every head against the whole packed body
        # in one product, other heads' rows masked out. The redundant arithmetic (n_kv_heads
        # times the per-head loop's) costs less than one kernel launch per head at this size.
        keys_t = key.body.t().expand(h_kv, d, n_body)
        if softcap is None:
            body = torch.baddbmm(key.foreign_bias, qs, keys_t, alpha=scaling)
        else:
            body = _capped(torch.bmm(qs, keys_t) * scaling, softcap) + key.foreign_bias
        probs = torch.softmax(torch.cat([body, tail], dim=-1), -1, dtype=torch.float32)
        probs = probs.to(value.body.dtype)
        out = torch.matmul(probs[..., :n_body], value.body)
        out.baddbmm_(probs[..., n_body:], value.tail)
        return out.view(hq, r, -1).transpose(0, 1)[None], None
    out = query.new_empty(h_kv, g * r, value.body.shape[-1])
    for h in range(h_kv):
        kb, vb = key.head(h), value.head(h)  # views into the packed body
        n_body = kb.shape[0]
        body = _capped(torch.mm(qs[h], kb.t()) * scaling, softcap)
        probs = torch.softmax(torch.cat([body, tail[h]], dim=-1), -1, dtype=torch.float32)
        probs = probs.to(vb.dtype)  # as eager attention: float32 softmax, cast back
        torch.mm(probs[:, :n_body], vb, out=out[h])
        out[h].addmm_(probs[:, n_body:], value.tail[h])
    out = out.view(hq, r, -1).transpose(0, 1)[None]
    return out, None


def _capped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def _check_window(module: nn.Module, window: int, span: int) -> None:
    if span > window:
        raise ConfigError(
            f"layer {getattr(module, 'layer_idx', '?')} attends through a sliding window of "
            f"{window} tokens, but a ragged head holds {span}; a ragged cache over "
            "sliding-window layers is exact only within the window. Use a shorter run or a "
            "model without sliding-window attention"
        )


def register() -> None:
    """Register :func:`ragged_attention_forward` with transformers (on use, when it is not).

    Checked at every use, not once: importing NVIDIA kvpress wraps every registered attention
    function in its head-masking patch, which reads dense key shapes, so a registration made
    before that import must be renewed.
    """
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if ALL_ATTENTION_FUNCTIONS.get(ATTENTION_NAME) is not ragged_attention_forward:
        AttentionInterface.register(ATTENTION_NAME, ragged_attention_forward)
    if ALL_ATTENTION_FUNCTIONS.get(ATTENTION_NAME) is not ragged_attention_forward:
        # kvpress writes its wrappers into the shared instance's own mapping, which wins
        ALL_ATTENTION_FUNCTIONS[ATTENTION_NAME] = ragged_attention_forward


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
