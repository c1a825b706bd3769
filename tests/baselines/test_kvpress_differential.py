"""Differential tests against NVIDIA kvpress 0.5.5 on the default model (query-agnostic).

kvpress compresses inside forward hooks and returns the kept keys in top-k order, without their
positions. The kept positions are recovered per layer and KV head by matching every kept key row
against the keys of an uncompressed forward pass over the same tokens (the press runs after each
layer's attention, so the keys it sees are exactly the uncompressed keys), and compared as sets
with the context positions our engine keeps.
"""

from __future__ import annotations

import kvpress  # the [kvpress] extra, installed in the lowest-version CI environment
import pytest
import torch
from transformers import DynamicCache

from kvpress_lab.engine.runner import prefill_and_compress
from kvpress_lab.prompt import PromptSegments
from kvpress_lab.spec import load_policy

pytestmark = [pytest.mark.slow, pytest.mark.kvpress]

L = 1000
KEEP_RATIO = 0.25


@pytest.fixture(scope="module")
def context_ids(default_lm) -> torch.Tensor:
    # seeded ordinary-word tokens: varied enough that scores have no ties
    words = (
        "river stone lamp orange window seven quiet market letter garden silver engine morning "
        "paper winter circle forest yellow bridge number music doctor island pocket summer table"
    ).split()
    gen = torch.Generator().manual_seed(1234)
    text = " ".join(words[int(i)] for i in torch.randint(len(words), (2 * L,), generator=gen))
    ids = default_lm.tokenizer(text, add_special_tokens=False)["input_ids"][:L]
    assert len(ids) == L
    return torch.tensor(ids)


@torch.no_grad()
def _kvpress_run(model, ids: torch.Tensor, press) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One forward under ``press``: (uncompressed keys, kept keys), each [H, n, D] per layer.

    A forward hook registered before the press's own hooks runs first and copies every layer's
    keys before the press compacts them.
    """
    full: list[torch.Tensor] = []
    cache = DynamicCache(config=model.config)

    def grab(module, args, kwargs, output):
        full.append(kwargs["past_key_values"].layers[module.layer_idx].keys[0].clone())

    handles = [
        layer.self_attn.register_forward_hook(grab, with_kwargs=True)
        for layer in model.model.layers
    ]
    try:
        with press(model):
            model(input_ids=ids[None], past_key_values=cache, use_cache=True)
    finally:
        for handle in handles:
            handle.remove()
    kept = [layer.keys[0] for layer in cache.layers]
    assert all(k.shape[1] == ids.numel() for k in full)
    return full, kept


def _kvpress_positions(full: list[torch.Tensor], kept: list[torch.Tensor]) -> torch.Tensor:
    """Positions of the kept key rows: [Ly, H, k], sorted, recovered by exact row matching."""
    out = []
    for k_full, k_kept in zip(full, kept, strict=True):
        per_head = []
        for h in range(k_full.shape[0]):
            dist = torch.cdist(
                k_kept[h].double(),
                k_full[h].double(),
                compute_mode="donot_use_mm_for_euclid_dist",
            )  # [k, n]
            best = dist.min(dim=-1)
            assert float(best.values.max()) == 0.0, "a kvpress key matches no uncompressed key"
            positions = best.indices.sort().values
            assert bool((positions.diff() > 0).all()), "two kvpress keys matched one position"
            per_head.append(positions)
        out.append(torch.stack(per_head))
    return torch.stack(out)


def _ours(lm, spec: str, ids: torch.Tensor) -> torch.Tensor:
    segments = PromptSegments(context_ids=ids, question_ids=torch.empty(0, dtype=torch.long))
    state = prefill_and_compress(lm, load_policy(spec), segments, query_agnostic=True)
    return state.context_index


def _compare(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    n_kept = int(L * (1 - (1 - KEEP_RATIO)))  # kvpress: int(L * (1 - compression_ratio))
    assert ours.shape[-1] == theirs.shape[-1] == n_kept == 250
    mismatched = [
        (layer, head)
        for layer in range(ours.shape[0])
        for head in range(ours.shape[1])
        if not torch.equal(ours[layer, head], theirs[layer, head])
    ]
    assert not mismatched, f"kept sets differ in (layer, head) {mismatched[:10]}"


def test_snapkv_matches_kvpress(default_lm, context_ids):
    press = kvpress.SnapKVPress(compression_ratio=1 - KEEP_RATIO, window_size=64, kernel_size=5)
    theirs = _kvpress_positions(*_kvpress_run(default_lm.model, context_ids, press))
    ours = _ours(
        default_lm,
        f"snapkv:keep_ratio={KEEP_RATIO},window=64,kernel=5,pooling=avg",
        context_ids,
    )
    _compare(ours, theirs)
    # the observation window (last 64 context tokens) is always kept
    assert bool((ours[..., -64:] == torch.arange(L - 64, L)).all())


def test_streamingllm_matches_kvpress(default_lm, context_ids):
    press = kvpress.StreamingLLMPress(compression_ratio=1 - KEEP_RATIO, n_sink=4)
    theirs = _kvpress_positions(*_kvpress_run(default_lm.model, context_ids, press))
    ours = _ours(default_lm, f"streamingllm:keep_ratio={KEEP_RATIO},rerotate=false", context_ids)
    _compare(ours, theirs)
    expected = torch.cat([torch.arange(4), torch.arange(L - 246, L)])
    assert bool((theirs == expected).all())


# native scorers (issue 12) against their kvpress presses, same input and recovery
def test_knorm_matches_kvpress(default_lm, context_ids):
    press = kvpress.KnormPress(compression_ratio=1 - KEEP_RATIO)
    theirs = _kvpress_positions(*_kvpress_run(default_lm.model, context_ids, press))
    ours = _ours(default_lm, f"knorm:keep_ratio={KEEP_RATIO}", context_ids)
    _compare(ours, theirs)
    assert not bool((ours == ours[:, :1]).all()), "knorm selects per KV head"


def test_tova_matches_kvpress(default_lm, context_ids):
    press = kvpress.TOVAPress(compression_ratio=1 - KEEP_RATIO)
    theirs = _kvpress_positions(*_kvpress_run(default_lm.model, context_ids, press))
    ours = _ours(default_lm, f"tova:keep_ratio={KEEP_RATIO}", context_ids)
    _compare(ours, theirs)
    assert bool((ours == ours[:, :1]).all()), "tova keeps one index set per layer"
    assert bool((ours[..., -1] == L - 1).all()), "the observing last token is always kept"


def test_keydiff_matches_kvpress(default_lm, context_ids):
    press = kvpress.KeyDiffPress(compression_ratio=1 - KEEP_RATIO)
    theirs = _kvpress_positions(*_kvpress_run(default_lm.model, context_ids, press))
    ours = _ours(default_lm, f"keydiff:keep_ratio={KEEP_RATIO}", context_ids)
    _compare(ours, theirs)


@pytest.mark.parametrize("use_vnorm", [True, False])
def test_expected_attention_matches_kvpress(default_lm, context_ids, use_vnorm):
    press = kvpress.ExpectedAttentionPress(compression_ratio=1 - KEEP_RATIO, use_vnorm=use_vnorm)
    theirs = _kvpress_positions(*_kvpress_run(default_lm.model, context_ids, press))
    spec = f"expected_attention:keep_ratio={KEEP_RATIO},use_vnorm={str(use_vnorm).lower()}"
    ours = _ours(default_lm, spec, context_ids)
    _compare(ours, theirs)
    assert bool((ours[..., :4] == torch.arange(4)).all()), "the 4 sinks are always kept"
    if use_vnorm:  # the option matters: without it other tokens are kept
        plain = _ours(default_lm, f"expected_attention:keep_ratio={KEEP_RATIO}", context_ids)
        other = _ours(
            default_lm, f"expected_attention:keep_ratio={KEEP_RATIO},use_vnorm=false", context_ids
        )
        assert torch.equal(plain, ours) and not torch.equal(other, ours)
