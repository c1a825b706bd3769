"""Llama-family attention: separate q/k/v projections, rotate-half RoPE over the whole head.

Covers llama (and SmolLM2), mistral (one sliding window for every layer), qwen2 (per-layer
sliding windows) and qwen3 (per-head ``q_norm`` before RoPE). The shared base already does all of
this; the family exists to name the architectures it has been proven on.
"""

from __future__ import annotations

from kvpress_lab.adapters.base import ModelAdapter

__all__ = ["LlamaAdapter"]


class LlamaAdapter(ModelAdapter):
    family = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    features = (
        "GQA",
        "rotate-half RoPE",
        "sliding window (mistral, qwen2)",
        "per-head q_norm (qwen3)",
    )
