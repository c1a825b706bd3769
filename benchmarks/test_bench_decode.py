"""Decode speed benchmarks (pytest-benchmark; not part of the default test run).

Run: ``python -m pytest benchmarks/test_bench_decode.py -s -p no:cacheprovider``
(``KVLAB_BENCH_DECODE_LENGTHS=8192,32768`` picks the lengths of the full-vs-compressed test;
``-m slow`` or no marker filter also runs the comparison on the default model.)

1. ``greedy_decode`` over a compressed cache vs ``model.generate`` over a copy of the same cache:
   same number of forward passes (one fed token, then ``N - 1`` generated ones fed back), greedy,
   no stop token, the two timed alternately. Target: within 5 % of ``generate``. The loop feeds
   the tokens at their original positions (the compressed cache keeps them, e.g. SnapKV's kept
   keys were rotated at positions up to ``L``), ``generate`` derives them from the cache length;
   the cost of a step does not depend on the position values. Before timing, both decode once at
   the same positions and must produce the same tokens, so the two loops do the same work.
2. Decode over the full cache (``L`` slots) vs the compressed one (``0.25 L`` slots) at 8k and 32k
   tokens on the tiny model. A step costs ``c0 + a * slots``: ``c0`` the projections, MLP and
   head (independent of the length), ``a * slots`` the attention over the cache plus the cache's
   append (transformers' ``DynamicCache`` concatenates, copying every slot once per token). ``c0``
   is measured on a 16-slot cache and ``a`` from the full cache, which predicts the ratio; the
   measured ratio is printed beside it. The caches hold random keys and values (a step's cost
   depends on their shape, not their values), so no 32k-token prefill is needed.
"""

from __future__ import annotations

import copy
import os
import statistics
import time

import pytest
import torch
from test_bench_scaling import long_context_tiny

from kvpress_lab.adapters import adapter_for
from kvpress_lab.engine.decode import greedy_decode
from kvpress_lab.engine.runner import prefill_and_compress
from kvpress_lab.models import LoadedModel, load_model
from kvpress_lab.prompt import PromptSegments
from kvpress_lab.spec import load_policy

NEW_TOKENS = 32
REPEATS = 5
TOLERANCE = 0.05  # greedy_decode may be at most 5 % slower than model.generate
KEEP_RATIO = 0.25


def tiny_lm() -> LoadedModel:
    """The scaling benchmark's tiny long-context model, with 4 layers."""
    return long_context_tiny(layers=4)


def decode_lengths() -> list[int]:
    raw = os.environ.get("KVLAB_BENCH_DECODE_LENGTHS", "8192,32768")
    return [int(x) for x in raw.split(",") if x.strip()]


def report(benchmark, **info) -> None:
    benchmark.extra_info.update(info)
    print("\n" + ", ".join(f"{k}={v}" for k, v in info.items()))


def _sync(lm: LoadedModel) -> None:
    if lm.device.type == "cuda":
        torch.cuda.synchronize(lm.device)


def ours(lm: LoadedModel, cache, token: torch.Tensor, position: int) -> tuple[float, list[int]]:
    """Seconds and tokens of ``greedy_decode`` feeding ``token`` at ``position`` (cache copy)."""
    c = copy.deepcopy(cache)
    _sync(lm)
    t0 = time.perf_counter()
    out = greedy_decode(adapter_for(lm.model), c, token, position, NEW_TOKENS, set())
    _sync(lm)
    return time.perf_counter() - t0, out


def generate(lm: LoadedModel, cache, token: torch.Tensor) -> tuple[float, list[int]]:
    """Seconds and tokens of ``model.generate`` feeding ``token`` over a copy of ``cache``.

    ``generate`` feeds only the ids the cache does not hold, so the ids are ``held`` fillers
    followed by ``token``; ``min_new_tokens`` keeps it from stopping early.
    """
    c = copy.deepcopy(cache)
    held = adapter_for(lm.model).cache_length(c)
    ids = torch.cat([torch.zeros(held, dtype=torch.long), token.cpu()])[None].to(lm.device)
    _sync(lm)
    t0 = time.perf_counter()
    out = lm.model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        past_key_values=c,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=0,
    )
    _sync(lm)
    return time.perf_counter() - t0, out[0, held + 1 :].tolist()


def compare_with_generate(lm: LoadedModel, context: torch.Tensor, question: torch.Tensor) -> dict:
    """Compress ``context`` with SnapKV (keep 0.25), then time both loops over that cache."""
    seg = PromptSegments(context_ids=context, question_ids=question)
    state = prefill_and_compress(lm, load_policy(f"snapkv:keep_ratio={KEEP_RATIO}"), seg)
    cache = state.cache
    if state.question_logits is not None:
        raise AssertionError("snapkv evicts, so the question must not be held in the cache")
    held = adapter_for(lm.model).cache_length(cache)
    token = question[:1].to(lm.device)
    # same positions (held..): both loops must produce the same tokens
    same_ours = ours(lm, cache, token, held)[1]
    same_gen = generate(lm, cache, token)[1]
    assert same_ours == same_gen, (same_ours, same_gen)
    mine, theirs = [], []
    for _ in range(REPEATS):  # interleaved, so load changes hit both alike
        mine.append(ours(lm, cache, token, state.next_position)[0])
        theirs.append(generate(lm, cache, token)[0])
    ratio = statistics.median(mine) / statistics.median(theirs)
    return {
        "context_tokens": seg.context_length,
        "cache_slots": held,
        "new_tokens": NEW_TOKENS,
        "greedy_decode_ms_per_token": round(statistics.median(mine) / NEW_TOKENS * 1e3, 3),
        "generate_ms_per_token": round(statistics.median(theirs) / NEW_TOKENS * 1e3, 3),
        "decode_vs_generate": round(ratio, 3),
        "target_within_5_percent": "met" if ratio <= 1 + TOLERANCE else "NOT met",
    }


def test_bench_decode_vs_generate_tiny(benchmark):
    lm = tiny_lm()
    torch.manual_seed(0)
    context = torch.randint(3, 253, (8192,))
    question = torch.randint(3, 253, (8,))
    info = benchmark.pedantic(
        compare_with_generate, args=(lm, context, question), rounds=1, iterations=1
    )
    report(benchmark, model="tiny-llama", **info)


@pytest.mark.slow
def test_bench_decode_vs_generate_default_model(benchmark):
    lm = load_model()
    text = "The grass is green. The sky is blue. The sun is yellow. Here we go. " * 120
    ids = torch.tensor(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
    question = torch.tensor(lm.tokenizer(" What is the colour of the sky?")["input_ids"])
    info = benchmark.pedantic(
        compare_with_generate, args=(lm, ids, question), rounds=1, iterations=1
    )
    report(benchmark, model=lm.name, **info)


def random_cache(lm: LoadedModel, slots: int):
    """A transformers ``DynamicCache`` holding ``slots`` random keys and values per layer."""
    from transformers import DynamicCache

    cfg = lm.model.config
    cache = DynamicCache(config=cfg)
    shape = (1, cfg.num_key_value_heads, slots, cfg.head_dim)
    gen = torch.Generator().manual_seed(slots)
    for layer in range(cfg.num_hidden_layers):
        k = torch.randn(shape, generator=gen, dtype=lm.dtype).to(lm.device)
        v = torch.randn(shape, generator=gen, dtype=lm.dtype).to(lm.device)
        cache.update(k, v, layer)
    return cache


def full_vs_compressed(lm: LoadedModel, length: int) -> dict:
    kept = int(KEEP_RATIO * length)
    caches = {"tiny": random_cache(lm, 16), "full": random_cache(lm, length)}
    caches["compressed"] = random_cache(lm, kept)
    token = torch.tensor([5], device=lm.device)
    times: dict[str, list[float]] = {name: [] for name in caches}
    for cache in caches.values():  # warm-up
        ours(lm, cache, token, length)
    for _ in range(REPEATS):
        for name, cache in caches.items():
            times[name].append(ours(lm, cache, token, length)[0])
    # ms per generated token (NEW_TOKENS - 1 passes feed tokens back, plus the first)
    per = {name: statistics.median(t) / NEW_TOKENS * 1e3 for name, t in times.items()}
    c0 = per["tiny"]
    slope = (per["full"] - c0) / (length - 16)  # ms per cached slot
    predicted = per["full"] / (c0 + slope * (kept - 16))
    return {
        "length": length,
        "kept_slots": kept,
        "full_ms_per_token": round(per["full"], 3),
        "compressed_ms_per_token": round(per["compressed"], 3),
        "length_independent_ms": round(c0, 3),
        "attention_share_full": round(1 - c0 / per["full"], 3),
        "speedup_measured": round(per["full"] / per["compressed"], 3),
        "speedup_predicted": round(predicted, 3),
    }


@pytest.mark.parametrize("length", decode_lengths())
def test_bench_decode_full_vs_compressed_tiny(benchmark, length):
    lm = tiny_lm()
    info = benchmark.pedantic(full_vs_compressed, args=(lm, length), rounds=1, iterations=1)
    report(benchmark, model="tiny-llama", **info)
