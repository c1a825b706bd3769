"""Decode speed over a ragged per-head cache vs a dense cache at the same total budget.

Run: ``python -m pytest benchmarks/test_bench_ragged.py -s --benchmark-disable-gc`` (or
``python benchmarks/test_bench_ragged.py`` for the table alone).

A tiny random llama-style model (4 layers, 8 query heads, 4 KV heads, head_dim 32) prefills a
4096-token context. The dense cache keeps 1024 tokens in every KV head (keep 0.25); the ragged
cache keeps 256, 512, 1536 and 1792 tokens in its four heads (the same 4096 tokens per layer,
rotated across layers), as a head-wise budget (AdaKV) would. Both then decode greedily; the
target is ragged decode within 1.3x the dense time per token. This is a benchmark, not a timed
test: it reports the ratio and whether the target is met.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from kvpress_lab.adapters import adapter_for
from kvpress_lab.testing.tiny import tiny_model

CONTEXT, PER_HEAD, STEPS, ROUNDS = 4096, 1024, 32, 3
RAGGED_SIZES = (256, 512, 1536, 1792)  # sums to 4 * PER_HEAD
CONFIG = dict(layers=4, heads=8, kv_heads=4, hidden_size=256, head_dim=32, intermediate_size=512)


def build(seed: int = 0):
    lm = tiny_model("llama", seed=seed, **CONFIG)
    ad = adapter_for(lm.model)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 250, (CONTEXT,), generator=gen)
    with torch.no_grad():
        full = ad.new_cache()
        pos = torch.arange(CONTEXT)
        ad.forward(ids, full, pos, pos)
    dense = ad.copy_cache(full)
    keep = []
    for layer in range(ad.n_layers):
        keys, values = ad.layer_kv(full, layer)
        idx = torch.stack(
            [torch.randperm(CONTEXT, generator=gen)[:PER_HEAD].sort().values for _ in range(4)]
        )
        gather = idx[None, :, :, None].expand(1, 4, PER_HEAD, keys.shape[-1])
        ad.set_layer_kv(dense, layer, keys.gather(2, gather), values.gather(2, gather))
        sizes = RAGGED_SIZES[layer % 4 :] + RAGGED_SIZES[: layer % 4]
        keep.append([torch.randperm(CONTEXT, generator=gen)[:n].sort().values for n in sizes])
    ragged = ad.ragged_cache(full, keep)
    return lm, ad, dense, ragged


def decode(ad, cache, steps: int = STEPS) -> float:
    """Seconds per decoded token, greedy, from position CONTEXT."""
    token = torch.tensor([5])
    start = time.perf_counter()
    with torch.no_grad():
        for step in range(steps):
            p = torch.tensor([CONTEXT + step])
            token = ad.forward(token, cache, p, p)[-1].argmax()[None]
    return (time.perf_counter() - start) / steps


def measure(threads: int | None = None) -> dict[str, float]:
    """Median seconds per token over ROUNDS rounds, alternating dense and ragged."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        lm, ad, dense, ragged = build()
        assert ad.kv_bytes(ragged) == ad.kv_bytes(dense)  # same total budget, same bytes
        decode(ad, ad.copy_cache(dense), 4)  # warm-up
        decode(ad, ad.copy_cache(ragged), 4)
        dense_s, ragged_s = [], []
        for _ in range(ROUNDS):
            dense_s.append(decode(ad, ad.copy_cache(dense)))
            ragged_s.append(decode(ad, ad.copy_cache(ragged)))
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
    d, r = statistics.median(dense_s), statistics.median(ragged_s)
    return {
        "threads": used,
        "kv_bytes": ad.kv_bytes(dense),
        "dense_tok_s": round(1 / d, 1),
        "ragged_tok_s": round(1 / r, 1),
        "ragged_over_dense_time": round(r / d, 3),
        "target_1_3x_met": r / d <= 1.3,
    }


@pytest.mark.parametrize("threads", [1, None], ids=["1-thread", "all-threads"])
def test_bench_ragged_decode(benchmark, threads):
    info = benchmark.pedantic(measure, args=(threads,), rounds=1, iterations=1)
    benchmark.extra_info.update(info)
    print("\n" + ", ".join(f"{k}={v}" for k, v in info.items()))
    assert info["dense_tok_s"] > 0 and info["ragged_tok_s"] > 0


if __name__ == "__main__":
    for n in (1, None):
        print(measure(n))
