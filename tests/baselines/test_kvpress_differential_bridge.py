"""The kvpress bridge on the default model: bridged SnapKV equals our snapkv and kvpress itself.

Same input, protocol (query-agnostic) and kept-key recovery as the other kvpress differential
tests. The bridge takes only kvpress's scores; the budget and top-k are kvpress-lab's, so the
bridged ``SnapKVPress`` must keep exactly what the native ``snapkv`` with kvpress's settings
(window 64, kernel 5, average pooling) keeps, and what kvpress keeps itself. The question-aware
protocol (the question inside SnapKV's window) is checked against the native policy too.
"""

from __future__ import annotations

import kvpress
import pytest
import torch
from test_kvpress_differential import (  # shared setup; its tests are not re-collected here
    KEEP_RATIO,
    L,
    _compare,
    _kvpress_positions,
    _kvpress_run,
    _ours,
    context_ids,  # noqa: F401 - module fixture
)

from kvpress_lab.engine.runner import prefill_and_compress
from kvpress_lab.prompt import PromptSegments
from kvpress_lab.spec import load_policy

pytestmark = [pytest.mark.slow, pytest.mark.kvpress]

BRIDGED = f"kvpress:keep_ratio={KEEP_RATIO},press=SnapKVPress/window_size=64/kernel_size=5"
NATIVE = f"snapkv:keep_ratio={KEEP_RATIO},window=64,kernel=5,pooling=avg"


def test_bridged_snapkv_equals_native_snapkv_and_kvpress(default_lm, context_ids):  # noqa: F811
    bridged = _ours(default_lm, BRIDGED, context_ids)
    native = _ours(default_lm, NATIVE, context_ids)
    assert torch.equal(bridged, native), "bridged SnapKVPress differs from native snapkv"
    press = kvpress.SnapKVPress(compression_ratio=1 - KEEP_RATIO, window_size=64, kernel_size=5)
    _compare(bridged, _kvpress_positions(*_kvpress_run(default_lm.model, context_ids, press)))
    assert bool((bridged[..., -64:] == torch.arange(L - 64, L)).all()), "window kept"


def test_bridged_snapkv_equals_native_snapkv_with_the_question(default_lm, context_ids):  # noqa: F811
    question = default_lm.tokenizer(" Which word came first?", add_special_tokens=False)
    segments = PromptSegments(
        context_ids=context_ids, question_ids=torch.tensor(question["input_ids"])
    )
    kept = [
        prefill_and_compress(default_lm, load_policy(spec), segments).context_index
        for spec in (BRIDGED, NATIVE)
    ]
    assert kept[0].shape[-1] == int(KEEP_RATIO * L)
    assert torch.equal(kept[0], kept[1])
