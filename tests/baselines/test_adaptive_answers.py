"""adakv and pyramidkv answer over their ragged cache exactly as attention over the full cache
masked to the same kept (layer, head, position) sets would, on tiny models of three families (the
masked eager reference of tests/core/test_adaptive_allocation.py, reused; that file runs the
ragged path on every supported architecture with hand-built plugins)."""

from __future__ import annotations

import pytest
import torch
from core.test_adaptive_allocation import (  # noqa: F401 - the fixture registers the reference
    KV_HEADS,
    LAYERS,
    _model,
    _reference_logits,
    _register_reference,
    _segments,
)

from kvpress_lab.engine.api import run_segments
from kvpress_lab.spec import load_policy

NEW_TOKENS = 8
# 48 context tokens, 6 question tokens. pyramidkv: C = 24, window 4, beta 2 -> 36 and 12 tokens
# in the two layers; adakv over knorm: 12 per head on average, pooled per layer
SPECS = {
    "pyramidkv": ("pyramidkv:keep_ratio=0.5,window=4,beta=2", [[36, 36], [12, 12]]),
    "adakv": ("adakv:keep_ratio=0.25,scorer=knorm", None),
}
# load the registry (and with it the kvpress bridge, which imports kvpress) before the reference
# attention is registered: importing kvpress wraps every attention function registered by then
# in a wrapper that passes an extra positional argument the reference does not take
POLICIES = {name: load_policy(spec) for name, (spec, _) in SPECS.items()}


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2"])
@torch.no_grad()
def test_answer_equals_the_masked_full_cache_reference(arch, name):
    counts = SPECS[name][1]
    lm = _model(arch)
    segments = _segments()
    result = run_segments(lm, POLICIES[name], segments, max_new_tokens=NEW_TOKENS)
    assert result.kept_counts is not None, "unequal counts: a ragged cache"
    if counts is not None:
        assert result.kept_counts.tolist() == counts
    else:
        assert result.kept_counts.sum(-1).tolist() == [KV_HEADS * 12] * LAYERS
    assert result.kept_total == LAYERS * KV_HEADS * int(result.target_tokens)
    rows = [
        [result.kept_positions(layer, head).tolist() for head in range(KV_HEADS)]
        for layer in range(LAYERS)
    ]
    reference = _reference_logits(lm, segments, rows, NEW_TOKENS)
    greedy = [int(logits.argmax()) for logits in reference[:NEW_TOKENS]]
    assert result.answer_token_ids == greedy[: len(result.answer_token_ids)]
    assert len(result.answer_token_ids) > 0
