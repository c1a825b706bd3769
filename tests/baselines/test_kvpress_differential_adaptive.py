"""adakv and pyramidkv against kvpress 0.5.5's ``AdaKVPress(SnapKVPress)`` and ``PyramidKVPress``.

Same input, protocol (query-agnostic) and settings as the other kvpress differential tests
(1000 tokens, keep 0.25 = compression_ratio 0.75, window 64, kernel 5, average pooling).

* kvpress's AdaKV does not shrink the cache: it records the evicted (head, position) pairs of
  every layer in ``self_attn.masked_key_indices`` and masks them at attention time. The kept set
  is every position of a head that is not recorded, compared as a set with the positions the
  engine keeps in that layer and head (its ragged rows are padded with -1 after each count).
* kvpress's PyramidKV compacts the cache to a per-layer count, so the kept positions are
  recovered per layer by the key matching of the shared setup. beta=2 gives a real pyramid
  (375 tokens in layer 0 down to 125 in layer 29); beta=20, kvpress's default, does not fit at
  this length and falls back to SnapKV's 250 everywhere (the SnapKV differential covers that).
* The per-layer budgets themselves are compared with kvpress's ``get_layer_budget`` over a grid
  of lengths, ratios, windows, betas and depths, fallbacks included, where ``keep_ratio * L`` is
  a whole number (otherwise kvpress's fallback rounds where ours floors, by design).
"""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import kvpress
import pytest
import torch
from kvlab_plugins.pyramidkv import pyramid_layer_counts
from test_kvpress_differential import (  # shared setup; its tests are not re-collected here
    KEEP_RATIO,
    L,
    _kvpress_positions,
    _kvpress_run,
    _ours,
    context_ids,  # noqa: F401 - module fixture
)
from transformers import DynamicCache

pytestmark = [pytest.mark.slow, pytest.mark.kvpress]

SNAPKV = "window=64,kernel=5,pooling=avg"


def _rows(index: torch.Tensor) -> list[list[list[int]]]:
    """Kept positions per layer and head, without the -1 padding of ragged rows."""
    return [[[p for p in row.tolist() if p >= 0] for row in layer] for layer in index]


@torch.no_grad()
def _kvpress_adakv_kept(model, ids: torch.Tensor, press) -> list[list[list[int]]]:
    """Positions kvpress's AdaKV leaves unmasked, per layer and KV head."""
    out = []
    n_kv = model.config.num_key_value_heads
    with press(model):
        model(
            input_ids=ids[None], past_key_values=DynamicCache(config=model.config), use_cache=True
        )
    for layer in model.model.layers:
        _, heads, positions = layer.self_attn.masked_key_indices
        kept = torch.ones(n_kv, ids.numel(), dtype=torch.bool)
        kept[heads.cpu(), positions.cpu()] = False
        out.append([row.nonzero().flatten().tolist() for row in kept])
        layer.self_attn.masked_key_indices = None  # the patched attention would mask with it
    return out


@pytest.mark.parametrize("alpha", [0.2, 0.5])
def test_adakv_over_snapkv_matches_kvpress(default_lm, context_ids, alpha):  # noqa: F811
    inner = kvpress.SnapKVPress(compression_ratio=1 - KEEP_RATIO, window_size=64, kernel_size=5)
    press = kvpress.AdaKVPress(press=inner, alpha_safeguard=alpha)
    theirs = _kvpress_adakv_kept(default_lm.model, context_ids, press)
    spec = f"adakv:keep_ratio={KEEP_RATIO},alpha_safeguard={alpha},scorer=snapkv+" + SNAPKV.replace(
        ",", "+"
    )
    ours = _rows(_ours(default_lm, spec, context_ids))
    mismatched = [
        (layer, head)
        for layer, head in itertools.product(range(len(ours)), range(len(ours[0])))
        if ours[layer][head] != theirs[layer][head]
    ]
    assert not mismatched, f"kept sets differ in (layer, head) {mismatched[:10]}"
    counts = torch.tensor([[len(row) for row in layer] for layer in ours])
    n_kept = int(L * KEEP_RATIO)
    assert counts.sum(-1).tolist() == [counts.shape[1] * n_kept] * counts.shape[0]
    assert bool((counts != n_kept).any()), "heads keep different counts"
    # every head keeps the window and at least floor(alpha * 250) tokens (the safeguard)
    assert int(counts.min()) >= max(64, math.floor(alpha * n_kept))
    assert all(row[-64:] == list(range(L - 64, L)) for layer in ours for row in layer)


def test_pyramidkv_matches_kvpress(default_lm, context_ids):  # noqa: F811
    beta = 2
    press = kvpress.PyramidKVPress(
        compression_ratio=1 - KEEP_RATIO, window_size=64, kernel_size=5, beta=beta
    )
    full, kept = _kvpress_run(default_lm.model, context_ids, press)
    ours = _ours(default_lm, f"pyramidkv:keep_ratio={KEEP_RATIO},{SNAPKV},beta={beta}", context_ids)
    n_layers = len(full)
    counts = pyramid_layer_counts(L, int(L * KEEP_RATIO), 64, beta, n_layers)
    assert sum(counts) == n_layers * 250 and (counts[0], counts[-1]) == (375, 125)
    for layer in range(n_layers):
        theirs = _kvpress_positions([full[layer]], [kept[layer]])[0]
        assert theirs.shape[-1] == counts[layer]
        mine = ours[layer, :, : counts[layer]]
        assert bool((ours[layer, :, counts[layer] :] == -1).all())
        assert torch.equal(mine, theirs), f"layer {layer} keeps other tokens than kvpress"


def test_pyramid_counts_are_kvpress_budgets():
    # kvpress's own formula, called with a stand-in module; 1 - compression_ratio exact in binary
    n = 0
    for length, keep, window, beta, n_layers in itertools.product(
        [320, 1000, 1024, 4096], [0.125, 0.25, 0.5, 0.75], [8, 32, 64], [1, 2, 8, 20], [2, 16, 30]
    ):
        press = kvpress.PyramidKVPress(compression_ratio=1 - keep, window_size=window, beta=beta)
        config = SimpleNamespace(num_hidden_layers=n_layers)
        theirs = [
            press.get_layer_budget(SimpleNamespace(config=config, layer_idx=layer), length)
            for layer in range(n_layers)
        ]
        target = math.floor(keep * length)
        assert pyramid_layer_counts(length, target, window, beta, n_layers) == theirs
        n += theirs != [target] * n_layers
    assert n > 100, "most settings build a real pyramid"
