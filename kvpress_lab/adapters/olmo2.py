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

    def project_queries(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        attn = self.attention(layer)
        q = attn.q_norm(attn.q_proj.forward(hidden))  # .forward: bypasses observer hooks
        return q.view(*hidden.shape[:2], -1, self.head_dim).transpose(1, 2)
