"""Gemma 2 and Gemma 3 attention.

Both scale logits by ``query_pre_attn_scalar ** -0.5`` (the attention's ``scaling``) and alternate
sliding-window and full layers (``config.layer_types``). Gemma 2 soft-caps attention logits
(``tanh(x / cap) * cap``); Gemma 3 normalises queries per head and gives local and global layers
their own rotary frequencies (one ``{layer_type}_inv_freq`` buffer each).
"""

from __future__ import annotations

import torch

from kvpress_lab.adapters.base import ModelAdapter, RopeSpec

__all__ = ["Gemma2Adapter", "Gemma3Adapter"]


class Gemma2Adapter(ModelAdapter):
    family = "gemma2"
    model_types = ("gemma2",)
    features = ("GQA", "logit soft-capping", "alternating sliding-window layers")


class Gemma3Adapter(ModelAdapter):
    family = "gemma3"
    model_types = ("gemma3", "gemma3_text")
    features = (
        "GQA",
        "per-head q_norm",
        "alternating sliding-window layers",
        "per-layer rotary (local/global)",
    )

    def rotary(self, layer: int, positions: torch.Tensor, like: torch.Tensor):
        pos = positions.to(like.device)[None]
        return self.rotary_module()(like, pos, self.layer_type(layer))

    def rope(self, layer: int) -> RopeSpec:
        rot = self.rotary_module()
        layer_type = self.layer_type(layer)
        inv_freq = getattr(rot, f"{layer_type}_inv_freq")
        return RopeSpec(
            inv_freq=inv_freq,
            rotary_dim=2 * inv_freq.numel(),
            rope_type=self._rope_type(rot, layer_type),
        )
