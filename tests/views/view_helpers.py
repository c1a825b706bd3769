"""Hand-built run results for the view tests (import as a module, not a conftest)."""

from __future__ import annotations

import torch

from kvpress_lab.engine.result import RunResult


def make_result(context: str, kept: list[list[list[int]]], answer: str = "4721") -> RunResult:
    """A RunResult over ``context`` (one char = one token, ids = 3 + ord) with given kept indices."""
    ids = [3 + ord(c) for c in context]
    idx = torch.tensor(kept, dtype=torch.long)
    return RunResult(
        answer=answer,
        answer_token_ids=[3 + ord(c) for c in answer],
        policy_name="hand",
        policy_params={"keep_ratio": 0.5, "budget": None, "window": 2},
        model="tiny-llama",
        protocol="question-aware",
        context_token_ids=ids,
        question_token_ids=[3 + ord("?")],
        kept_indices=idx,
        kv_bytes_full=1000,
        kv_bytes_kept=500,
        peak_kv_tokens=len(ids) + 1,
        peak_kv_bytes=1000,
        prefill_s=0.01,
        compress_s=0.01,
        decode_s=0.01,
        blocks=1,
        target_tokens=idx.shape[-1],
    )


def hand_result() -> RunResult:
    # 8 tokens, 2 layers x 2 heads, 4 kept per head: token 0 and 7 kept by all four heads,
    # token 1 by three, token 2 by one, tokens 4 and 5 by none.
    context = "ab<c>d&e"
    kept = [[[0, 1, 2, 7], [0, 1, 3, 7]], [[0, 1, 6, 7], [0, 3, 6, 7]]]
    return make_result(context, kept)
