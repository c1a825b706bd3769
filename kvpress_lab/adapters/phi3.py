"""Phi-3 attention: one fused ``qkv_proj``; RoPE may cover only part of each head.

The queries are the first ``num_attention_heads * head_dim`` outputs of ``qkv_proj``. Partial
rotary (``partial_rotary_factor < 1``) rotates the leading channels only; the family's own RoPE
function handles that for queries, and :class:`~kvpress_lab.adapters.base.RopeSpec` carries the
rotary dimension for re-rotation.
"""

from __future__ import annotations

import torch
from torch import nn

from kvpress_lab.adapters.base import ModelAdapter

__all__ = ["Phi3Adapter"]


class Phi3Adapter(ModelAdapter):
    family = "phi3"
    model_types = ("phi3",)
    features = ("GQA", "fused qkv_proj", "partial rotary", "sliding window")

    def query_projection(self, layer: int) -> nn.Module:
        return self.attention(layer).qkv_proj

    def queries_from_projection(self, layer: int, projected: torch.Tensor) -> torch.Tensor:
        q = projected[..., : self.n_heads * self.head_dim]  # queries first, then keys, values
        return q.reshape(*projected.shape[:2], self.n_heads, self.head_dim).transpose(1, 2)
