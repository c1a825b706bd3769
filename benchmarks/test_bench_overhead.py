"""Compression overhead of every one-shot policy vs NVIDIA kvpress, side by side (issue 14, part 4).

Run: ``python -m pytest benchmarks/test_bench_overhead.py -s --benchmark-disable-gc``

Target: ``compress time / prefill time <= 2 %`` for every one-shot policy at ~4k tokens on the
default model, on an idle machine. Ours: ``RunResult``-style ``prefill_s`` / ``compress_s`` from
:func:`~kvpress_lab.engine.runner.prefill_and_compress` (scorer time is measured inside the
forward and moved from prefill to compression; selection and compaction count as compression).
kvpress (``SnapKVPress``, ``StreamingLLMPress``, keep 25 %): one forward of the same tokens under
the press, with the press's ``compress`` (its scoring and pruning, called inside every layer's
hook) timed; prefill = forward time minus that. Runs are interleaved (every policy once per
round, after one warm-up run of each side) and the per-policy median over rounds is reported,
with the 1-minute load average, since the machine may be shared.

Environment: ``KVLAB_OVERHEAD_ROUNDS`` (default 3) and ``KVLAB_OVERHEAD_POLICIES`` (a comma
list of ours; default every one-shot policy) shorten a run.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch
from test_bench_laserkv import report, segments_near
from transformers import DynamicCache

from kvpress_lab.engine.runner import prefill_and_compress
from kvpress_lab.models import load_model
from kvpress_lab.registry import default_registry
from kvpress_lab.spec import load_policy

TARGET = 0.02
KEEP_RATIO = 0.25
TOKENS = 4096


def one_shot_policies() -> list[str]:
    """Every registered policy that compresses once after prefill at ~4k tokens (not ``full``)."""
    chosen = os.environ.get("KVLAB_OVERHEAD_POLICIES")
    if chosen:
        return chosen.split(",")
    names = []
    for name in default_registry().names("policy"):
        if name == "full":
            continue
        block = load_policy(name).compose().engine.block_size
        if block is None or block >= TOKENS:  # laserkv's default block covers 4k: one block
            names.append(name)
    return names


@pytest.fixture(scope="module")
def lm():
    return load_model()


def ours(lm, name: str, seg) -> tuple[float, float]:
    state = prefill_and_compress(lm, load_policy(f"{name}:keep_ratio={KEEP_RATIO}"), seg)
    return state.prefill_s, state.compress_s


class TimedPress:
    """Wraps a kvpress press so that the time spent in its ``compress`` is summed."""

    def __init__(self, press) -> None:
        self.press, self.seconds = press, 0.0
        inner = press.compress

        def compress(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        press.compress = compress


@torch.no_grad()
def theirs(lm, press_name: str, ids: torch.Tensor) -> tuple[float, float]:
    import kvpress

    timed = TimedPress(getattr(kvpress, press_name)(compression_ratio=1 - KEEP_RATIO))
    cache = DynamicCache(config=lm.model.config)
    t0 = time.perf_counter()
    with timed.press(lm.model):
        lm.model(input_ids=ids[None].to(lm.device), past_key_values=cache, use_cache=True)
    total = time.perf_counter() - t0
    return total - timed.seconds, timed.seconds


def test_bench_overhead_ours_vs_kvpress_4k(lm, benchmark):
    pytest.importorskip("kvpress")
    seg = segments_near(lm, TOKENS)
    ids = torch.cat([seg.context_ids, seg.question_ids])
    rounds = int(os.environ.get("KVLAB_OVERHEAD_ROUNDS", "3"))
    ours_names = one_shot_policies()
    kvpress_names = ["SnapKVPress", "StreamingLLMPress"]
    runs: dict[str, list[tuple[float, float]]] = {}
    loads = []

    # warm-up (first-call allocations, lazy imports), not counted
    ours(lm, ours_names[0], seg)
    theirs(lm, kvpress_names[0], ids)

    def measure():
        for _ in range(rounds):
            loads.append(os.getloadavg()[0])
            for name in ours_names:
                runs.setdefault(name, []).append(ours(lm, name, seg))
            for name in kvpress_names:
                runs.setdefault(f"kvpress:{name}", []).append(theirs(lm, name, ids))

    benchmark.pedantic(measure, rounds=1, iterations=1)
    rows = {}
    for name, values in runs.items():
        ratio = statistics.median(c / p for p, c in values)
        rows[name] = (
            statistics.median(p for p, _ in values),
            statistics.median(c for _, c in values),
            ratio,
        )
    lines = [f"{'policy':34} {'prefill_s':>9} {'compress_s':>10} {'ratio':>7}  target<=2%"]
    for name, (p, c, r) in rows.items():
        met = "met" if r <= TARGET else "NOT met"
        lines.append(f"{name:34} {p:9.3f} {c:10.4f} {100 * r:6.2f}%  {met}")
    load = f"tokens={ids.numel()}, rounds={rounds}, load average (1 min) per round: {loads}"
    print("\n" + "\n".join(lines) + "\n" + load)
    report(
        benchmark,
        tokens=int(ids.numel()),
        rounds=rounds,
        load_average=loads,
        **{f"{k}_ratio": round(v[2], 5) for k, v in rows.items()},
        target=TARGET,
        target_met=[k for k, v in rows.items() if not k.startswith("kvpress:") and v[2] <= TARGET],
        target_missed=[
            k for k, v in rows.items() if not k.startswith("kvpress:") and v[2] > TARGET
        ],
    )
