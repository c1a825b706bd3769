"""The ragged per-head KV cache and the attention over it.

The reference is a *dense* cache holding every token, attended by the family's own eager
attention with a per-layer, per-head mask that hides the evicted context slots (the way kvpress
realises AdaKV): the ragged cache must give the same logits for the question prefill and for
32 decode steps on every supported architecture.
"""

from __future__ import annotations

import sys

import pytest
import torch

from kvpress_lab.adapters import adapter_for, ragged_attention, supported_model_types
from kvpress_lab.adapters.ragged_attention import (
    attention_implementation,
    ragged_attention_forward,
)
from kvpress_lab.adapters.ragged_cache import RaggedCache, ragged_from_dense
from kvpress_lab.errors import ConfigError
from kvpress_lab.testing.tiny import ARCHS, tiny_model

REFERENCE = "kvlab_test_masked_eager"
CONTEXT, QUESTION, STEPS = 48, 6, 32


class _Reference:
    """Per-layer [H_kv, CONTEXT] boolean masks of kept context slots, read by the reference."""

    keep: list[torch.Tensor] = []


def masked_eager(module, query, key, value, attention_mask, **kwargs):
    """The family's eager attention over the dense cache, evicted slots masked per head."""
    eager = sys.modules[type(module).__module__].eager_attention_forward
    r, n = query.shape[-2], key.shape[-2]
    h_kv = key.shape[1]
    g = query.shape[1] // h_kv
    keep = _Reference.keep[module.layer_idx]  # [H_kv, CONTEXT]
    cols = torch.arange(n)[None, :]
    rows = torch.arange(r)[:, None]
    new_visible = (cols >= CONTEXT) & (cols <= rows + (n - r))  # appended tokens, causal
    allowed = new_visible[None].expand(h_kv, r, n).clone()
    allowed[:, :, :CONTEXT] = keep[:, None, :]
    allowed = allowed.repeat_interleave(g, dim=0)[None]  # [1, H_q, r, n]
    mask = torch.zeros(allowed.shape, dtype=query.dtype)
    mask = mask.masked_fill(~allowed, torch.finfo(query.dtype).min)
    kwargs.pop("sliding_window", None)
    return eager(module, query, key, value, mask, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def _register_reference():
    from transformers import AttentionInterface

    AttentionInterface.register(REFERENCE, masked_eager)


def _unequal_keep(n_layers: int, n_heads: int, seed: int) -> list[list[torch.Tensor]]:
    """Per layer and head, a sorted random subset of the context, every head a different size."""
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for layer in range(n_layers):
        heads = []
        for h in range(n_heads):
            size = [0, 7, 30, 45][(layer + h) % 4] if n_heads > 1 else 20
            heads.append(torch.randperm(CONTEXT, generator=gen)[:size].sort().values)
        keep.append(heads)
    return keep


def test_every_supported_architecture_is_covered():
    from kvpress_lab.testing import tiny

    families = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "olmo2"}
    assert set(ARCHS) == families
    assert set(supported_model_types()) <= families | {"gemma3_text"}
    assert tiny.ARCHS == ARCHS


@pytest.mark.parametrize("path", ["batched", "per-head"])
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_equal_masked_dense_reference_over_32_decode_steps(arch, path, monkeypatch):
    # the tiny layers all fit the batched (whole-body, masked) path; a limit of 0 forces the loop
    if path == "per-head":
        monkeypatch.setattr(ragged_attention, "BATCHED_MAX_PRODUCTS", 0)
    lm = tiny_model(arch, seed=3, layers=2, heads=4, kv_heads=2)
    ad = adapter_for(lm.model)
    gen = torch.Generator().manual_seed(11)
    context = torch.randint(3, 250, (CONTEXT,), generator=gen)
    question = torch.randint(3, 250, (QUESTION,), generator=gen)
    keep = _unequal_keep(ad.n_layers, ad.n_kv_heads, seed=5)
    _Reference.keep = []
    for heads in keep:
        mask = torch.zeros(ad.n_kv_heads, CONTEXT, dtype=torch.bool)
        for h, ix in enumerate(heads):
            mask[h, ix] = True
        _Reference.keep.append(mask)

    with torch.no_grad():
        dense = ad.new_cache()
        pos = torch.arange(CONTEXT)
        ad.forward(context, dense, pos, pos)
        ragged = ad.ragged_cache(dense, keep)
        full = ad.copy_cache(dense)  # nothing evicted: shows the eviction changes the logits
        assert [ad.head_lengths(ragged, layer) for layer in range(ad.n_layers)] == [
            [ix.numel() for ix in heads] for heads in keep
        ]

        q_pos = torch.arange(CONTEXT, CONTEXT + QUESTION)
        got = ad.forward(question, ragged, q_pos, q_pos, logits_to_keep=QUESTION)
        with attention_implementation(lm.model.config, REFERENCE):
            want = ad.forward(question, dense, q_pos, q_pos, logits_to_keep=QUESTION)
        unmasked = ad.forward(question, full, q_pos, q_pos, logits_to_keep=QUESTION)
        assert (got - want).abs().max().item() <= 1e-5
        assert (got - unmasked).abs().max().item() > 1e-3

        token = got[-1].argmax()
        for step in range(STEPS):
            p = torch.tensor([CONTEXT + QUESTION + step])
            got = ad.forward(token[None], ragged, p, p)
            with attention_implementation(lm.model.config, REFERENCE):
                want = ad.forward(token[None], dense, p, p)
            diff = (got - want).abs().max().item()
            assert diff <= 1e-5, f"{arch}: decode step {step} differs by {diff}"
            token = got[-1].argmax()

    appended = QUESTION + STEPS
    for layer, heads in enumerate(keep):
        assert ad.head_lengths(ragged, layer) == [ix.numel() + appended for ix in heads]
        for h, ix in enumerate(heads):
            want_pos = torch.cat([ix, torch.arange(CONTEXT, CONTEXT + appended)])
            assert torch.equal(ad.head_positions(ragged, layer, h), want_pos)
    assert lm.model.config._attn_implementation != "kvlab_ragged"  # restored after each pass


def _hand_dense(n_layers=2, n_heads=3, n=10, d=4, dtype=torch.float16):
    gen = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(1, n_heads, n, d, generator=gen).to(dtype),
            torch.randn(1, n_heads, n, d, generator=gen).to(dtype),
        )
        for _ in range(n_layers)
    ]


def _measured_bytes(cache: RaggedCache) -> int:
    total = 0
    for lay in cache.layers:
        for t in (lay.body_keys, lay.body_values, lay.tail_keys, lay.tail_values):
            if t is not None:
                total += t.untyped_storage().nbytes()
    return total


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_bytes_are_the_sum_of_per_head_lengths(dtype):
    dense = _hand_dense(dtype=dtype)
    keep = [
        [torch.tensor([0, 3, 9]), torch.tensor([], dtype=torch.long), torch.arange(10)],
        [torch.tensor([5]), torch.tensor([1, 2]), torch.tensor([4, 6, 8, 9])],
    ]
    cache = ragged_from_dense(dense, keep)
    d, size = 4, torch.tensor([], dtype=dtype).element_size()
    lengths = cache.layer_lengths()
    assert lengths == [[3, 0, 10], [1, 2, 4]]
    per_token = d * 2 * size  # keys and values
    assert cache.kv_bytes() == _measured_bytes(cache) == sum(map(sum, lengths)) * per_token
    # the dense layout of the same budget would pad every head to the longest one (10 and 4)
    assert cache.kv_bytes() < (3 * 10 + 3 * 4) * per_token

    # the kept rows are exactly the dense rows at the kept slots, per head
    for layer, heads in enumerate(keep):
        for h, ix in enumerate(heads):
            k, v = cache.layers[layer].head_kv(h)
            assert torch.equal(k, dense[layer][0][0, h, ix])
            assert torch.equal(v, dense[layer][1][0, h, ix])
            assert torch.equal(cache.layers[layer].head_positions(h), ix)

    # decode appends go to a tail with doubling capacity; compact() folds it in exactly
    for step in range(20):
        for layer in range(2):
            new = torch.full((1, 3, 1, d), float(step), dtype=dtype)
            cache.layers[layer].append(new, new)
    capacity = cache.layers[0].tail_capacity()
    assert capacity == 32
    assert cache.kv_bytes() == _measured_bytes(cache)
    assert cache.kv_bytes() == (sum(map(sum, lengths)) + 2 * 3 * capacity) * per_token
    cache.compact()
    assert cache.layer_lengths() == [[23, 20, 30], [21, 22, 24]]
    assert cache.kv_bytes() == _measured_bytes(cache) == (23 + 20 + 30 + 21 + 22 + 24) * per_token
    k, _ = cache.layers[1].head_kv(2)
    assert torch.equal(k[:4], dense[1][0][0, 2, [4, 6, 8, 9]])
    assert k[4:, 0].tolist() == [float(s) for s in range(20)]


def test_decode_appends_never_copy_the_packed_body():
    dense = _hand_dense(n_layers=1, dtype=torch.float32)
    cache = ragged_from_dense(dense, [[torch.arange(6), torch.arange(2), torch.arange(9)]])
    lay = cache.layers[0]
    body_ptr = lay.body_keys.data_ptr()
    tail_ptrs = set()
    for _ in range(200):
        new = torch.randn(1, 3, 1, 4)
        lay.append(new, new)
        tail_ptrs.add(lay.tail_keys.data_ptr())
    assert lay.body_keys.data_ptr() == body_ptr
    assert len(tail_ptrs) == 5  # capacities 16, 32, 64, 128, 256: amortised O(1) per token
    assert lay.head_lengths() == [206, 202, 209]


def test_copies_are_independent():
    lm = tiny_model("llama", seed=1, layers=2, heads=4, kv_heads=2)
    ad = adapter_for(lm.model)
    ids = torch.randint(3, 250, (20,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        dense = ad.new_cache()
        ad.forward(ids, dense, torch.arange(20), torch.arange(20))
        keep = [[torch.arange(0, 20, 3), torch.arange(12, 20)] for _ in range(2)]
        original = ad.ragged_cache(dense, keep)
        p = torch.tensor([20])
        ad.forward(ids[:1], original, p, p)  # the original has a tail before copying
        lengths = original.layer_lengths()
        tail = original.layers[0].tail_keys[:, :1].clone()
        clone = ad.copy_cache(original)
        assert ad.kv_bytes(clone) == ad.kv_bytes(original)
        p2 = torch.tensor([21])
        from_clone = ad.forward(ids[5:6], clone, p2, p2)
        assert original.layer_lengths() == lengths  # appending to the copy left it alone
        assert clone.layer_lengths() == [[n + 1 for n in heads] for heads in lengths]
        assert torch.equal(original.layers[0].tail_keys[:, :1], tail)
        from_original = ad.forward(ids[5:6], original, p2, p2)
        assert torch.equal(from_original, from_clone)


def test_clear_errors_for_unsupported_uses():
    lm = tiny_model("mistral", seed=0, layers=1, heads=4, kv_heads=2, sliding_window=16)
    ad = adapter_for(lm.model)
    ids = torch.randint(3, 250, (20,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = ad.new_cache()
        ad.forward(ids, dense, torch.arange(20), torch.arange(20))
        ragged = ad.ragged_cache(dense, [[torch.arange(4), torch.arange(15)]])
        with pytest.raises(ConfigError, match="layer 0 .* has no dense"):
            ad.layer_kv(ragged, 0)
        with pytest.raises(ConfigError, match="3 per-head index lists for 2 KV heads"):
            ad.ragged_cache(dense, [[torch.arange(4)] * 3])
        with pytest.raises(ConfigError, match="1 per-head index lists for 2 KV heads"):
            ad.ragged_cache(dense, [[torch.arange(4)]])
        with pytest.raises(ConfigError, match="kept index 20 .* outside the cache's 20 slots"):
            ad.ragged_cache(dense, [[torch.arange(4), torch.arange(21)]])
        p = torch.tensor([20])
        ad.forward(ids[:1], ragged, p, p)  # 16 tokens in the longest head: within the window
        p = torch.tensor([21])
        with pytest.raises(ConfigError, match="sliding window of 16 tokens, but a ragged head"):
            ad.forward(ids[:1], ragged, p, p)
        assert lm.model.config._attn_implementation == "sdpa"  # restored after the failure
        with pytest.raises(ConfigError, match="batch size 1"):
            ragged.layers[0].append(torch.zeros(2, 2, 1, 16), torch.zeros(2, 2, 1, 16))
    attn = ad.attention(0)
    q = torch.zeros(1, 4, 1, 16)
    with pytest.raises(ConfigError, match="received dense keys; pass a RaggedCache"):
        ragged_attention_forward(attn, q, torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), None)
