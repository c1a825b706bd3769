"""chunkkv against kvpress 0.5.5's ``ChunkKVPress(press=SnapKVPress(...))`` on the default model.

Same input, protocol (query-agnostic) and kept-key recovery as the other kvpress differential
tests. kvpress keeps ``int(n_chunks * keep_ratio)`` whole chunks while chunkkv keeps exactly
``floor(keep_ratio * L)`` tokens, so the settings make the budget a whole number of chunks
(1000 tokens, chunks of 25, keep 0.25: 10 chunks, 250 tokens) and SnapKV's observation window a
whole number of chunks (50 tokens = the last 2 chunks); then the two keep the same tokens.
"""

from __future__ import annotations

import kvpress
import pytest
import torch
from test_kvpress_differential import (  # shared setup; its tests are not re-collected here
    KEEP_RATIO,
    L,
    _kvpress_positions,
    _kvpress_run,
    _ours,
    context_ids,  # noqa: F401 - module fixture
)

pytestmark = [pytest.mark.slow, pytest.mark.kvpress]

CHUNK = 25
WINDOW = 50


def test_chunkkv_over_snapkv_matches_kvpress(default_lm, context_ids):  # noqa: F811
    inner = kvpress.SnapKVPress(compression_ratio=1 - KEEP_RATIO, window_size=WINDOW, kernel_size=5)
    press = kvpress.ChunkKVPress(press=inner, chunk_length=CHUNK)
    theirs = _kvpress_positions(*_kvpress_run(default_lm.model, context_ids, press))
    spec = (
        f"chunkkv:keep_ratio={KEEP_RATIO},chunk_length={CHUNK},"
        f"scorer=snapkv+window={WINDOW}+kernel=5+pooling=avg"
    )
    ours = _ours(default_lm, spec, context_ids)
    assert ours.shape[-1] == theirs.shape[-1] == int(KEEP_RATIO * L) == 250
    assert torch.equal(ours, theirs), "kept chunks differ from kvpress ChunkKVPress"
    # whole chunks, the same in every head of a layer, the window's two chunks always among them
    chunks = ours.view(*ours.shape[:2], -1, CHUNK)
    assert bool((chunks == chunks[..., :1] + torch.arange(CHUNK)).all())
    assert bool((chunks[..., 0] % CHUNK == 0).all())
    assert bool((ours == ours[:, :1]).all())
    assert bool((ours[..., -WINDOW:] == torch.arange(L - WINDOW, L)).all())
    # and the chunks are not simply the same everywhere: layers choose differently
    assert not bool((ours == ours[:1]).all())
