"""Decode speed over a ragged per-head cache vs a dense cache at the same total budget.

Run: ``python -m pytest benchmarks/test_bench_ragged.py -s --benchmark-disable-gc`` (or
``python benchmarks/test_bench_ragged.py`` for the table alone).

Two models prefill a 4096-token context:

* ``tiny``: a random llama-style model (4 layers, 8 query heads, 4 KV heads, head_dim 32,
  hidden 256). Its layers are so small that attention is most of a decode step: the worst case
  for the per-head work a ragged cache needs.
* ``default``: the default model (SmolLM2-135M-Instruct: 30 layers, 9 query heads, 3 KV heads,
  head_dim 64), the model of the memory target.

The dense cache keeps a quarter of the context (keep 0.25) in every KV head; the ragged cache
keeps the same number of tokens per layer split unevenly between the heads (from a quarter to
seven quarters of the dense count, rotated across layers), as a head-wise budget (AdaKV) would.
Both decode greedily, alternating over several rounds; the target is ragged decode within 1.3x
the dense time per token. This is a benchmark, not a timed test: it reports the ratio and
whether the target is met.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from kvpress_lab.adapters import adapter_for
from kvpress_lab.testing.tiny import tiny_model

CONTEXT, STEPS = 4096, 16
ROUNDS = {"tiny": 41, "default": 9}  # paired rounds; the tiny one is noise-prone
PER_HEAD = CONTEXT // 4  # keep 0.25
TARGET = 1.3
CONFIG = dict(layers=4, heads=8, kv_heads=4, hidden_size=256, head_dim=32, intermediate_size=512)
MODELS = ("tiny", "default")


def ragged_sizes(n_heads: int) -> tuple[int, ...]:
    """Uneven per-head counts (PER_HEAD / 4 up to 7 * PER_HEAD / 4) summing to n_heads * PER_HEAD."""
    if n_heads == 1:
        return (PER_HEAD,)
    step = (6 * PER_HEAD // 4) // (n_heads - 1)
    sizes = [PER_HEAD // 4 + i * step for i in range(n_heads)]
    sizes[-1] += n_heads * PER_HEAD - sum(sizes)
    return tuple(sizes)


def load(name: str, seed: int = 0):
    if name == "tiny":
        return tiny_model("llama", seed=seed, **CONFIG)
    from kvpress_lab.models import load_model

    return load_model()


def build(name: str = "tiny", seed: int = 0):
    lm = load(name, seed)
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
        n_kv = keys.shape[1]
        idx = torch.stack(
            [torch.randperm(CONTEXT, generator=gen)[:PER_HEAD].sort().values for _ in range(n_kv)]
        )
        gather = idx[None, :, :, None].expand(1, n_kv, PER_HEAD, keys.shape[-1])
        ad.set_layer_kv(dense, layer, keys.gather(2, gather), values.gather(2, gather))
        base = ragged_sizes(n_kv)
        sizes = base[layer % n_kv :] + base[: layer % n_kv]
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


def measure(threads: int | None = None, name: str = "tiny") -> dict[str, float]:
    """Seconds per token, dense and ragged decoded in pairs (which goes first alternates).

    The ratio is the median of the pairs' ratios, so a slow spell on the shared machine moves
    both members of a pair rather than one side of the comparison.
    """
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        lm, ad, dense, ragged = build(name)
        assert ad.kv_bytes(ragged) == ad.kv_bytes(dense)  # same total budget, same bytes
        decode(ad, ad.copy_cache(dense), 4)  # warm-up
        decode(ad, ad.copy_cache(ragged), 4)
        dense_s, ragged_s = [], []
        for i in range(ROUNDS[name]):
            if i % 2:
                ragged_s.append(decode(ad, ad.copy_cache(ragged)))
            dense_s.append(decode(ad, ad.copy_cache(dense)))
            if not i % 2:
                ragged_s.append(decode(ad, ad.copy_cache(ragged)))
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
    d, r = statistics.median(dense_s), statistics.median(ragged_s)
    ratio = statistics.median(b / a for a, b in zip(dense_s, ragged_s, strict=True))
    return {
        "model": name,
        "threads": used,
        "kv_bytes": ad.kv_bytes(dense),
        "dense_tok_s": round(1 / d, 1),
        "ragged_tok_s": round(1 / r, 1),
        "ragged_over_dense_time": round(ratio, 3),
        "target_1_3x_met": ratio <= TARGET,
    }


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("threads", [1, None], ids=["1-thread", "all-threads"])
def test_bench_ragged_decode(benchmark, threads, name):
    info = benchmark.pedantic(measure, args=(threads, name), rounds=1, iterations=1)
    benchmark.extra_info.update(info)
    print("\n" + ", ".join(f"{k}={v}" for k, v in info.items()))
    assert info["dense_tok_s"] > 0 and info["ragged_tok_s"] > 0


if __name__ == "__main__":
    for model in MODELS:
        for n in (1, None):
            print(measure(n, model))
