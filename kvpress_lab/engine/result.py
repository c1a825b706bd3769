"""The result of one run: answer, kept indices, memory and timings."""

from __future__ import annotations

from typing import Any

import attrs
import torch

__all__ = ["RunResult"]


@attrs.frozen
class RunResult:
    """Everything a run produced. ``kept_indices[l, h]`` are indices into ``context_token_ids``.

    When every layer and KV head keeps the same count ``k`` (every equal-count policy),
    ``kept_indices`` is ``[layers, kv_heads, k]`` and ``kept_counts`` is None. When they keep
    different counts (per-layer or per-head allocations, a ragged cache), ``kept_counts``
    ``[layers, kv_heads]`` holds each row's count and ``kept_indices`` is
    ``[layers, kv_heads, max count]``: row ``(l, h)`` holds its ``kept_counts[l, h]`` positions in
    ascending order, then ``-1`` padding. :meth:`kept_positions` gives one row without padding;
    ``to_dict`` writes the rows unpadded (lists of different lengths).
    """

    answer: str
    answer_token_ids: list[int]
    policy_name: str
    policy_params: dict[str, Any]
    model: str
    protocol: str  # "question-aware" or "query-agnostic"
    context_token_ids: list[int]
    question_token_ids: list[int]
    kept_indices: torch.Tensor  # [layers, kv_heads, kept] long, sorted per row (-1 padded)
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
    # [layers, kv_heads] kept context tokens per row when rows differ (ragged), else None
    kept_counts: torch.Tensor | None = None

    @property
    def context_tokens(self) -> int:
        return len(self.context_token_ids)

    @property
    def row_counts(self) -> torch.Tensor:
        """[layers, kv_heads] long: kept context tokens of every layer and KV head."""
        if self.kept_counts is not None:
            return self.kept_counts
        ly, h, k = self.kept_indices.shape
        return torch.full((ly, h), k, dtype=torch.long)

    @property
    def kept_tokens(self) -> float:
        """Mean kept context tokens per layer and KV head."""
        if self.kept_counts is None:
            return float(self.kept_indices.shape[-1])
        return float(self.kept_counts.double().mean())

    @property
    def kept_total(self) -> int:
        """Kept context tokens summed over layers and KV heads (the fairness total)."""
        return int(self.row_counts.sum())

    @property
    def kept_per_layer(self) -> list[float]:
        """Per layer, the mean kept context tokens over its KV heads."""
        return [float(v) for v in self.row_counts.double().mean(-1)]

    @property
    def kept_per_layer_range(self) -> tuple[float, float, float]:
        """(min, mean, max) over layers of :attr:`kept_per_layer`, for reports."""
        per_layer = self.kept_per_layer
        return min(per_layer), sum(per_layer) / len(per_layer), max(per_layer)

    def kept_positions(self, layer: int, head: int) -> torch.Tensor:
        """Context positions kept by ``layer``'s KV head ``head``, ascending, without padding."""
        row = self.kept_indices[layer, head]
        return row if self.kept_counts is None else row[: int(self.kept_counts[layer, head])]

    @property
    def retention(self) -> torch.Tensor:
        """[context_tokens] fraction of (layer, KV head) pairs that kept each context token."""
        ly, h, _ = self.kept_indices.shape
        kept = self.kept_indices.flatten().cpu()
        kept = kept[kept >= 0]  # drops the padding of a ragged result
        counts = torch.zeros(self.context_tokens)
        counts.index_add_(0, kept, torch.ones(kept.numel()))
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
            "kept_total": self.kept_total,
            "kept_per_layer": self.kept_per_layer,
            "kept_per_layer_range": dict(
                zip(("min", "mean", "max"), self.kept_per_layer_range, strict=True)
            ),
        }
        if indices:
            data["context_token_ids"] = self.context_token_ids
            if self.kept_counts is None:
                data["kept_indices"] = self.kept_indices.tolist()
            else:
                ly, h = self.kept_counts.shape
                data["kept_indices"] = [
                    [self.kept_positions(layer, head).tolist() for head in range(h)]
                    for layer in range(ly)
                ]
        return data
