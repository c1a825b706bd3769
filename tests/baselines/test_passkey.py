"""Passkey retrieval on the default model at keep_ratio 0.5 (~2k tokens), one run per baseline.

The needle sits at 75% depth: StreamingLLM keeps only the sinks and the most recent half, so a
needle in the middle is evicted by construction (see notes/baselines-passkey.md for the measured
middle-depth runs); at 75% every baseline can and must answer.
"""

from __future__ import annotations

import pytest

from kvpress_lab.engine.api import run

pytestmark = pytest.mark.slow

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is 71432. Remember it. 71432 is the pass key. "


def haystack(repeats: int, depth: float) -> str:
    before = round(repeats * depth)
    return (NOISE * before + NEEDLE + NOISE * (repeats - before)).strip()


@pytest.mark.parametrize("policy", ["snapkv", "h2o", "streamingllm", "finch"])
def test_passkey_at_half_cache(default_lm, policy):
    result = run(
        default_lm,
        f"{policy}:keep_ratio=0.5",
        haystack(90, 0.75),
        "What is the pass key?",
        "The pass key is",
        max_new_tokens=8,
    )
    assert 1900 <= result.context_tokens <= 2300
    assert result.kept_tokens == result.context_tokens // 2
    assert "71432" in result.answer, f"{policy} answered {result.answer!r}"
