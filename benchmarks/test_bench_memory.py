"""Peak memory of block-wise LASER-KV at 128k tokens on the tiny model (issue 14, part 2).

Run: ``python -m pytest benchmarks/test_bench_memory.py -s``  (``KVLAB_MEMORY_TOKENS`` changes
the context length, default 131072)

Block-wise LASER-KV (keep_ratio 0.1, 1024-token blocks) never holds more than the kept tokens,
one block and the question; its scorers form attention in blocks of at most
:func:`~kvpress_lab.interfaces.attention_chunk_elements` weights. Recorded: the engine's peak KV
(tokens and bytes), the one-shot full cache it replaces (context + question tokens at the same
bytes per token, computed, not run), their ratio (target < 30 %), and the process's peak RSS
(``ru_maxrss``) before and after the run.
"""

from __future__ import annotations

import os
import resource
import time

from test_bench_laserkv import report

from kvpress_lab.engine.runner import prefill_and_compress
from kvpress_lab.prompt import build_prompt
from kvpress_lab.spec import load_policy
from kvpress_lab.testing.tiny import tiny_model

TOKENS = int(os.environ.get("KVLAB_MEMORY_TOKENS", str(128 * 1024)))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def test_bench_laserkv_blockwise_peak_memory_tiny(benchmark):
    lm = tiny_model("llama", seed=0, max_position_embeddings=2 * TOKENS)
    text = ("abcdefghij klmnopqrst uvwxyz 0123456789 " * (TOKENS // 40 + 1))[: TOKENS - 40]
    seg = build_prompt(lm.tokenizer, text, "what comes after x?")
    policy = load_policy("laserkv:keep_ratio=0.1,block_size=1024")
    rss_before = peak_rss_mib()
    t0 = time.perf_counter()
    state = benchmark.pedantic(prefill_and_compress, args=(lm, policy, seg), rounds=1, iterations=1)
    wall = time.perf_counter() - t0
    full_tokens = seg.context_length + seg.question_length
    bytes_per_token = state.peak_kv_bytes / state.peak_kv_tokens
    full_bytes = full_tokens * bytes_per_token
    fraction = state.peak_kv_bytes / full_bytes
    report(
        benchmark,
        context_tokens=seg.context_length,
        blocks=state.blocks,
        peak_kv_tokens=state.peak_kv_tokens,
        peak_kv_bytes=state.peak_kv_bytes,
        full_cache_bytes=int(full_bytes),
        peak_kv_fraction=round(fraction, 4),
        peak_rss_mib_before=round(rss_before, 1),
        peak_rss_mib_after=round(peak_rss_mib(), 1),
        wall_s=round(wall, 1),
    )
    assert fraction < 0.3, f"peak KV is {fraction:.1%} of the full cache (target < 30%)"
