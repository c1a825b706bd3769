"""OLMo 2 attention: ``q_norm`` normalises the whole query projection, before it is split into
heads (unlike qwen3 and gemma3, which normalise per head)."""

from __future__ import annotations

import torch

from kvpress_lab.adapters.base import ModelAdapter

__all__ = ["Olmo2Adapter"]


class Olmo2Adapter(ModelAdapter):
    family = "olmo2"
    model_types = ("olmo2",)
    features = ("GQA", "q_norm over the whole projection")

    def queries_from_projection(self, layer: int, projected: torch.Tensor) -> torch.Tensor:
        q = self.attention(layer).q_norm.forward(projected)  # .forward: no hooks
        return q.view(*projected.shape[:2], -1, self.head_dim).transpose(1, 2)
