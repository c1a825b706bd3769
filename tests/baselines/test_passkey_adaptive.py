"""Passkey retrieval on the default model at keep_ratio 0.25 by the adaptive policies (issue 11).

The haystack and needle are test_passkey's (needle in the middle, ~1k tokens: 40 repeats). Both
policies end with a ragged cache holding the uniform total (252 tokens per layer and KV head on
average) and still give the pass key. pyramidkv runs with beta=4: at this length the default
beta=20 (with the default 32-token window) does not fit a pyramid and falls back to SnapKV's
uniform budget, which the SnapKV passkey test already covers.
"""

from __future__ import annotations

import pytest
from test_passkey import haystack

from kvpress_lab.engine.api import run

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("policy", ["adakv:keep_ratio=0.25", "pyramidkv:keep_ratio=0.25,beta=4"])
def test_passkey_at_quarter_cache(default_lm, policy):
    result = run(
        default_lm,
        policy,
        haystack(40, 0.5),
        "What is the pass key?",
        "The pass key is ",
        max_new_tokens=8,
    )
    n_layers, n_kv = result.kept_indices.shape[:2]
    assert result.context_tokens == 1009
    assert result.kept_counts is not None, "rows keep different counts: a ragged cache"
    assert result.kept_total == n_layers * n_kv * (1009 // 4)
    per_layer = result.kept_per_layer
    if policy.startswith("pyramidkv"):  # 441 tokens in layer 0 down to 63 in the last
        assert (per_layer[0], per_layer[-1]) == (441.0, 63.0)
    assert "71432" in result.answer, f"{policy} answered {result.answer!r}"
