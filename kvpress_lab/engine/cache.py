"""Operations on a transformers DynamicCache: real smaller tensors, never masks."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from kvpress_lab.errors import PluginError

__all__ = ["gather_slots", "keep_mask_to_indices", "kv_bytes", "layer_kv", "set_layer_kv"]


def layer_kv(cache: DynamicCache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    lay = cache.layers[layer]
    return lay.keys, lay.values


def set_layer_kv(cache: DynamicCache, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    lay = cache.layers[layer]
    lay.keys, lay.values = keys, values


def kv_bytes(cache: DynamicCache) -> int:
    """Bytes held by keys and values of every layer."""
    total = 0
    for lay in cache.layers:
        if getattr(lay, "keys", None) is not None and lay.keys.numel():
            total += lay.keys.numel() * lay.keys.element_size()
            total += lay.values.numel() * lay.values.element_size()
    return total


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


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x: [B, H, N, D]; idx: [H'|1, k] -> [B, H, k, D]."""
    if idx.shape[0] == 1:
        return x.index_select(2, idx[0].to(x.device))
    b, h, _, d = x.shape
    gather_idx = idx.to(x.device)[None, :, :, None].expand(b, h, idx.shape[-1], d)
    return x.gather(2, gather_idx)


def gather_slots(cache: DynamicCache, indices: torch.Tensor) -> None:
    """Keep only ``indices`` ([Ly'|1, H'|1, k] slot indices) in every layer, in place."""
    for layer in range(len(cache.layers)):
        idx = indices[layer if indices.shape[0] > 1 else 0]
        keys, values = layer_kv(cache, layer)
        set_layer_kv(cache, layer, _take(keys, idx), _take(values, idx))
