"""The result of one run: answer, kept indices, memory and timings."""

from __future__ import annotations

from typing import Any

import attrs
import torch

__all__ = ["RunResult"]


@attrs.frozen
class RunResult:
    """Everything a run produced. ``kept_indices[l, h]`` are indices into ``context_token_ids``."""

    answer: str
    answer_token_ids: list[int]
    policy_name: str
    policy_params: dict[str, Any]
    model: str
    protocol: str  # "question-aware" or "query-agnostic"
    context_token_ids: list[int]
    question_token_ids: list[int]
    kept_indices: torch.Tensor  # [layers, kv_heads, kept] long, sorted per row
    kv_bytes_full: int
    kv_bytes_kept: int
    peak_kv_tokens: int
    peak_kv_bytes: int
    prefill_s: float
    compress_s: float
    decode_s: float
    blocks: int
    target_tokens: int
    # generation-time compression (policy options decode_interval/decode_budget): compressions
    # made while decoding, and the most slots held after any decode forward pass (context,
    # question and generated tokens; the cache at the start of decoding when nothing was fed)
    decode_compressions: int = 0
    decode_peak_kv_tokens: int = 0
    # wall time of scorers' probe passes (KVzip's context reconstruction), part of compress_s
    probe_s: float = 0.0

    @property
    def context_tokens(self) -> int:
        return len(self.context_token_ids)

    @property
    def kept_tokens(self) -> float:
        """Mean kept context tokens per layer (and KV head)."""
        return float(self.kept_indices.shape[-1])

    @property
    def retention(self) -> torch.Tensor:
        """[context_tokens] fraction of (layer, KV head) pairs that kept each context token."""
        ly, h, _ = self.kept_indices.shape
        counts = torch.zeros(self.context_tokens)
        counts.index_add_(
            0, self.kept_indices.flatten().cpu(), torch.ones(self.kept_indices.numel())
        )
        return counts / (ly * h)

    def to_dict(self, indices: bool = True) -> dict[str, Any]:
        data = {
            "answer": self.answer,
            "policy": {"name": self.policy_name, **self.policy_params},
            "model": self.model,
            "protocol": self.protocol,
            "context_tokens": self.context_tokens,
            "question_tokens": len(self.question_token_ids),
            "target_tokens": self.target_tokens,
            "kept_tokens": self.kept_tokens,
            "kv_bytes_full": self.kv_bytes_full,
            "kv_bytes_kept": self.kv_bytes_kept,
            "peak_kv_tokens": self.peak_kv_tokens,
            "peak_kv_bytes": self.peak_kv_bytes,
            "prefill_s": round(self.prefill_s, 6),
            "compress_s": round(self.compress_s, 6),
            "decode_s": round(self.decode_s, 6),
            "blocks": self.blocks,
            "decode_compressions": self.decode_compressions,
            "decode_peak_kv_tokens": self.decode_peak_kv_tokens,
            "probe_s": round(self.probe_s, 6),
        }
        if indices:
            data["context_token_ids"] = self.context_token_ids
            data["kept_indices"] = self.kept_indices.tolist()
        return data
