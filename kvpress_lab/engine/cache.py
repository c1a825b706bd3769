"""Compaction of the engine's cache: real smaller tensors, never masks.

Cache layer access goes through the model adapter, the one place that knows how transformers
stores keys and values.
"""

from __future__ import annotations

import torch

from kvpress_lab.adapters import ModelAdapter
from kvpress_lab.errors import PluginError
from kvpress_lab.interfaces import take_slots

__all__ = ["gather_slots", "keep_layer_slots", "keep_mask_to_indices"]


def keep_mask_to_indices(keep: torch.Tensor, who: str) -> torch.Tensor:
    """[Ly', H', N] bool with equal counts per row -> [Ly', H', k] sorted slot indices."""
    counts = keep.sum(-1)
    k = int(counts.flatten()[0])
    if not bool((counts == k).all()):
        raise PluginError(
            f"{who} kept a different number of tokens in different layers/heads "
            f"(min {int(counts.min())}, max {int(counts.max())}); every layer and KV head must keep "
            "the same count so the cache stays a dense tensor"
        )
    slots = torch.arange(keep.shape[-1], device=keep.device).expand_as(keep)
    return slots[keep].view(*keep.shape[:-1], k)


def gather_slots(adapter: ModelAdapter, cache: object, indices: torch.Tensor) -> None:
    """Keep only ``indices`` ([Ly'|1, H'|1, k] slot indices) in every layer, in place."""
    for layer in range(adapter.n_layers):
        keep_layer_slots(adapter, cache, layer, indices[layer if indices.shape[0] > 1 else 0])


def keep_layer_slots(adapter: ModelAdapter, cache: object, layer: int, idx: torch.Tensor) -> None:
    """Keep only slots ``idx`` ([H'|1, k]) of one layer, in place (new tensors, never a mask).

    The layer-wise path calls it inside the forward pass, right after the layer's attention.
    """
    keys, values = adapter.layer_kv(cache, layer)
    adapter.set_layer_kv(cache, layer, take_slots(keys, idx), take_slots(values, idx))
