"""Passkey retrieval on the default model at keep_ratio 0.5 (~2k tokens), one run per baseline.

The needle sits in the middle. The answer prefix ends with a space: SmolLM2's tokenizer writes
the space before a number as its own token, and without it the model continues with words even
with the full cache (measured; notes/baselines-passkey.md). At keep_ratio 0.5 SnapKV,
StreamingLLM and FINCH answer; H2O answers something else. H2O is marked as an expected failure
(strict: if it starts answering, the test says so and the note must be updated); every
structural check still runs for it.
"""

from __future__ import annotations

import pytest

from kvpress_lab.engine.api import run

pytestmark = pytest.mark.slow

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is 71432. Remember it. 71432 is the pass key. "


class WrongAnswer(Exception):
    """The run completed with the expected cache size but did not give the pass key."""


def haystack(repeats: int, depth: float) -> str:
    before = round(repeats * depth)
    return (NOISE * before + NEEDLE + NOISE * (repeats - before)).strip()


MEASURED_FAILURE = pytest.mark.xfail(
    strict=True,
    raises=WrongAnswer,
    reason="measured on SmolLM2-135M at keep_ratio 0.5: wrong answer (notes/baselines-passkey.md)",
)


@pytest.mark.parametrize(
    "policy",
    [
        "snapkv",
        pytest.param("h2o", marks=MEASURED_FAILURE),
        "streamingllm",
        "finch",
    ],
)
def test_passkey_at_half_cache(default_lm, policy):
    result = run(
        default_lm,
        f"{policy}:keep_ratio=0.5",
        haystack(80, 0.5),
        "What is the pass key?",
        "The pass key is ",
        max_new_tokens=8,
    )
    assert 1900 <= result.context_tokens <= 2100
    assert result.kept_tokens == result.context_tokens // 2
    if "71432" not in result.answer:
        raise WrongAnswer(f"{policy} answered {result.answer!r}")
