"""LASER-KV on the default SmolLM2 model: a ~4k-token passkey retrieval (slow)."""

from __future__ import annotations

import time

import pytest

from kvpress_lab.engine.api import run

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is 71432. Remember it. 71432 is the pass key. "


def passkey_context(repeats: int = 165) -> str:
    """About 4k tokens of noise with the pass key sentence inserted mid-way."""
    half = repeats // 2
    return NOISE * half + NEEDLE + NOISE * (repeats - half)


@pytest.mark.slow
def test_laserkv_finds_the_pass_key_in_4k_tokens(default_lm):
    start = time.perf_counter()
    result = run(
        default_lm,
        "laserkv:keep_ratio=0.25",
        passkey_context(),
        # SmolLM2-135M needs the format hint: with the bare "What is the pass key?" even the full
        # cache answers "a special type of pass cipher" at 4k tokens (checked by hand)
        "What is the pass key? Answer with the number.",
        "The pass key is",
        max_new_tokens=8,
    )
    elapsed = time.perf_counter() - start
    L = len(result.context_token_ids)
    assert 3800 <= L <= 4096  # one 4096-token block
    assert "71432" in result.answer
    # the cache holds the plain budget floor(0.25 L), the needle among it
    assert result.kept_indices.shape[-1] == int(0.25 * L)
    # timing: 4k prefill is ~20 s on an idle 2-core CPU; allow for shared CI machines
    assert elapsed < 300
