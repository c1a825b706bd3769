"""LASER-KV benchmarks on the default model (pytest-benchmark; not part of the default test run).

Run: ``python -m pytest benchmarks/test_bench_laserkv.py -s --benchmark-disable-gc``

1. compression overhead at ~4k tokens: ``compress_s / prefill_s`` (target < 10 %);
2. peak KV memory of block-wise prefill (keep_ratio 0.25, 1024-token blocks) vs full prefill on
   a ~7.9k-token context (target < 40 % of full);
3. decode speed (tokens/s) over the compressed cache vs the full cache.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch

from kvpress_lab.adapters import adapter_for
from kvpress_lab.engine.api import run_segments
from kvpress_lab.engine.decode import greedy_decode
from kvpress_lab.engine.runner import prefill_and_compress
from kvpress_lab.models import load_model
from kvpress_lab.prompt import build_prompt
from kvpress_lab.spec import load_policy

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is 71432. Remember it. 71432 is the pass key. "
# trailing space: SmolLM2 writes the space before a number as its own token
QUESTION, PREFIX = "What is the pass key?", "The pass key is "
DECODE_TOKENS = 32


def haystack(repeats: int) -> str:
    half = repeats // 2
    return NOISE * half + NEEDLE + NOISE * (repeats - half)


@pytest.fixture(scope="module")
def lm():
    return load_model()


def segments_near(lm, tokens: int):
    """Prompt segments whose context + question is just under ``tokens`` tokens."""
    per_repeat = len(lm.tokenizer(NOISE, add_special_tokens=False)["input_ids"])
    repeats = tokens // per_repeat
    while True:
        seg = build_prompt(lm.tokenizer, haystack(repeats), QUESTION, PREFIX)
        if seg.context_length + seg.question_length <= tokens:
            return seg
        repeats -= 2


def report(benchmark, **info) -> None:
    benchmark.extra_info.update(info)
    print("\n" + ", ".join(f"{k}={v}" for k, v in info.items()))


def test_bench_compression_overhead_4k(lm, benchmark):
    seg = segments_near(lm, 4096)
    policy = load_policy("laserkv:keep_ratio=0.25")
    res = benchmark.pedantic(
        run_segments, args=(lm, policy, seg), kwargs={"max_new_tokens": 8}, rounds=1, iterations=1
    )
    report(
        benchmark,
        context_tokens=seg.context_length,
        blocks=res.blocks,
        prefill_s=round(res.prefill_s, 2),
        compress_s=round(res.compress_s, 2),
        compress_fraction=round(res.compress_s / res.prefill_s, 4),
        answer=res.answer,
    )


@pytest.fixture(scope="module")
def states_8k(lm):
    seg = segments_near(lm, 8192 - DECODE_TOKENS - 8)
    return seg, {}


def test_bench_peak_kv_blockwise_vs_full_8k(lm, states_8k, benchmark):
    seg, states = states_8k
    t0 = time.perf_counter()
    states["full"] = prefill_and_compress(lm, load_policy("full"), seg)
    full_s = time.perf_counter() - t0
    policy = load_policy("laserkv:keep_ratio=0.25,block_size=1024")
    laser = benchmark.pedantic(prefill_and_compress, args=(lm, policy, seg), rounds=1, iterations=1)
    states["laserkv"] = laser
    full = states["full"]
    report(
        benchmark,
        context_tokens=seg.context_length,
        question_tokens=seg.question_length,
        full_peak_kv_tokens=full.peak_kv_tokens,
        full_peak_kv_bytes=full.peak_kv_bytes,
        laserkv_peak_kv_tokens=laser.peak_kv_tokens,
        laserkv_peak_kv_bytes=laser.peak_kv_bytes,
        peak_kv_fraction=round(laser.peak_kv_bytes / full.peak_kv_bytes, 4),
        laserkv_kept_tokens=laser.kept_tokens,
        laserkv_blocks=laser.blocks,
        full_prefill_s=round(full.prefill_s, 2),
        full_wall_s=round(full_s, 2),
        laserkv_prefill_s=round(laser.prefill_s, 2),
        laserkv_compress_s=round(laser.compress_s, 2),
    )


def _decode_seconds(lm, state, seg, n: int) -> float:
    """Seconds to feed the question and decode ``n`` tokens (no stop tokens) on a cache copy."""
    cache = copy.deepcopy(state.cache)
    first = state.question_logits
    t0 = time.perf_counter()
    greedy_decode(
        adapter_for(lm.model), cache, seg.question_ids, state.next_position, n, set(), first
    )
    if lm.device.type == "cuda":
        torch.cuda.synchronize(lm.device)
    return time.perf_counter() - t0


def test_bench_decode_speed_compressed_vs_full(lm, states_8k, benchmark):
    seg, states = states_8k
    # reuse the caches the peak-KV benchmark built; build them when run on its own
    if "full" not in states:
        states["full"] = prefill_and_compress(lm, load_policy("full"), seg)
    if "laserkv" not in states:
        policy = load_policy("laserkv:keep_ratio=0.25,block_size=1024")
        states["laserkv"] = prefill_and_compress(lm, policy, seg)

    def measure():
        speeds = {}
        for name, state in states.items():
            # decode time = (question + 1 + DECODE_TOKENS steps) - (question + 1 step)
            dt = _decode_seconds(lm, state, seg, DECODE_TOKENS + 1) - _decode_seconds(
                lm, state, seg, 1
            )
            speeds[name] = DECODE_TOKENS / dt
        return speeds

    speeds = benchmark.pedantic(measure, rounds=1, iterations=1)
    report(
        benchmark,
        full_cache_tokens=states["full"].kept_tokens,
        laserkv_cache_tokens=states["laserkv"].kept_tokens,
        full_tokens_per_s=round(speeds["full"], 2),
        laserkv_tokens_per_s=round(speeds["laserkv"], 2),
        speedup=round(speeds["laserkv"] / speeds["full"], 3),
    )
