"""KVzip against kvpress 0.5.5 ``KVzipPress`` on the default model.

kvpress's pipeline wraps the context in the chat template and ``KVzipPress`` leaves the template's
opening unscored, so both sides get the same templated context: the shared differential context
after the template's prefix. kvpress does not compact its cache (it masks pruned keys at attention
time, with a different count per layer and head), so its *scores* are read instead of its cache:
``compress_post`` is wrapped to copy ``score_val`` before it prunes. Checked: the scores are
equal, and our kept positions are, index for index, the per-KV-head top-k of kvpress's scores
with its sink rule (the first ``n_sink`` slots scored highest). The per-layer counts kvpress's
global pruning would keep are checked to differ, which is the one deliberate difference.
"""

from __future__ import annotations

from types import SimpleNamespace

import kvpress  # the [kvpress] extra, installed in the lowest-version CI environment
import pytest
import torch
from kvlab_plugins.kvzip import template_parts
from kvpress.presses import kvzip_press
from test_kvpress_differential import KEEP_RATIO, context_ids  # noqa: F401 (fixture)
from test_kvzip import engine_scores
from transformers import DynamicCache

from kvpress_lab.prompt import PromptSegments

pytestmark = [pytest.mark.slow, pytest.mark.kvpress]

N_SINK = 4


@torch.no_grad()
def _kvpress_scores(lm, ids: torch.Tensor, monkeypatch, chunk_size: int) -> dict:
    """KVzipPress over ``ids``: its scores [Ly, H, n] and the tokens it would keep per layer."""
    model = lm.model
    seen: dict = {}
    original = kvzip_press.KVzipPress.compress_post

    def capture(self, model):
        seen["scores"] = self.score_val[:, 0].clone()
        seen["prefix"] = self.prefix_length
        original(self, model)
        seen["pruned"] = [
            len(layer.self_attn.masked_key_indices[2]) for layer in model.model.layers
        ]

    monkeypatch.setattr(kvzip_press.KVzipPress, "compress_post", capture)
    # the default model is read from a GGUF file kvpress cannot open: hand it our tokenizer
    monkeypatch.setattr(
        kvzip_press, "AutoTokenizer", SimpleNamespace(from_pretrained=lambda *a, **k: lm.tokenizer)
    )
    press = kvpress.KVzipPress(compression_ratio=1 - KEEP_RATIO, chunk_size=chunk_size)
    try:
        with press(model):
            model(input_ids=ids[None], past_key_values=DynamicCache(config=model.config))
    finally:  # leave no masked keys nor borrowed rotary modules on the shared model
        for layer in model.model.layers:
            layer.self_attn.masked_key_indices = None
            layer.self_attn._modules.pop("rotary_emb", None)
    return seen


@pytest.mark.parametrize(
    ("chunk_size", "length", "query_agnostic"), [(2048, 1000, False), (128, 400, True)]
)
def test_kvzip_matches_kvpress(
    default_lm,
    context_ids,  # noqa: F811 (the shared fixture)
    monkeypatch,
    chunk_size,
    length,
    query_agnostic,
):
    prefix = template_parts(default_lm.tokenizer)[0]
    ids = torch.cat([torch.tensor(prefix), context_ids[:length]])
    n = ids.numel()
    question = default_lm.tokenizer("\n\nWhich word comes first?", add_special_tokens=False)
    segments = PromptSegments(
        context_ids=ids,
        question_ids=torch.empty(0, dtype=torch.long)
        if query_agnostic
        else torch.tensor(question["input_ids"]),
    )
    theirs = _kvpress_scores(default_lm, ids, monkeypatch, chunk_size)
    assert theirs["prefix"] == len(prefix) == 24
    spec = f"kvzip:keep_ratio={KEEP_RATIO},chunk_size={chunk_size}"
    ours, kept = engine_scores(default_lm, segments, chunk_size, query_agnostic, spec=spec)
    ours = ours[..., :n]
    torch.testing.assert_close(ours, theirs["scores"], rtol=1e-4, atol=1e-6)
    assert bool((ours[..., N_SINK : len(prefix)] == 0).all()), "the template opening is unscored"

    k = int(KEEP_RATIO * n)
    assert kept.shape[-1] == k
    # kvpress's sink rule (the first n_sink slots above every score), then each head's top-k
    boosted = theirs["scores"].clone()
    boosted[..., :N_SINK] = boosted.amax() + 1.0
    expected = boosted.topk(k, dim=-1).indices.sort(dim=-1).values
    mismatched = [
        (layer, head)
        for layer in range(kept.shape[0])
        for head in range(kept.shape[1])
        if not torch.equal(kept[layer, head], expected[layer, head])
    ]
    assert not mismatched, f"kept sets differ in (layer, head) {mismatched[:10]}"
    # the deliberate difference: kvpress prunes over all layers at once, unequal per layer
    kvpress_kept = [kept.shape[1] * n - p for p in theirs["pruned"]]
    assert len(set(kvpress_kept)) > 1
    assert sum(theirs["pruned"]) == int(kept.shape[0] * kept.shape[1] * n * (1 - KEEP_RATIO))
