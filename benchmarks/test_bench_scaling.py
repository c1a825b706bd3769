"""Scaling benchmark: every shipped policy against the context length (issue 14, part 1).

Run (lengths in tokens, comma-separated; the default is the full 4k..128k sweep)::

    KVLAB_BENCH_LENGTHS=4096,8192,16384 python -m pytest benchmarks/test_bench_scaling.py \\
        -s -p no:cacheprovider
    python scripts/plot_scaling.py   # table -> notes/bench-scaling.md, plots -> docs/img/

Each policy (every ``kvlab_policies`` entry of the registry but the kvpress bridge) runs at
``keep_ratio=0.25`` with its default options on a tiny random Llama built in-process: 2 layers,
4 query heads sharing 2 KV heads of 64 dimensions, 131072 + 4096 positions (the longest context,
then room for the question, the answer and KVzip's probe after it). The context is random
token ids, the question 16 tokens, 8 answer tokens. Per cell it records the wall time of
prefill, compression and decode (the engine's own split, :class:`~kvpress_lab.engine.result.
RunResult`), the peak resident memory of the process during the run (Linux ``VmHWM``, reset
before each run through ``/proc/self/clear_refs``; the growth over the resident memory before the
run is what the run itself allocated) and the peak KV slots held per layer.

Expected growth of the peak KV in ``L`` (context tokens), ``Q`` question tokens, keep ratio
``r``:

- one-shot policies (the whole context in one forward pass): ``L + Q``;
- block-wise policies (``block_size = S``: LASER-KV, Finch): the kept tokens of the earlier
  blocks plus one block plus the question, at most ``r L + S + Q``;
- policies whose scorer runs probe passes (KVzip, Kim et al. 2025, re-feeds the context in
  chunks of ``C = chunk_size`` tokens after a repeat prompt of ``p`` tokens, over the full
  cache): ``L + Q + C + p``.

Both grow with slope 1 on a log-log plot; what separates them is the coefficient (1 vs ``r``).
Prefill time grows with slope between 1 (projections, MLP) and 2 (attention over the whole
prefix); compression and decode over ``r L`` slots grow with slope at most 1 plus the scoring's
own cost. Results are appended to ``KVLAB_BENCH_SCALING_OUT`` (default
``notes/bench-scaling.json``); a cell that fails records the error instead of numbers.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import time
import traceback
from pathlib import Path

import attrs
import pytest
import torch

from kvpress_lab.engine.api import run_segments
from kvpress_lab.interfaces import Scorer
from kvpress_lab.prompt import PromptSegments
from kvpress_lab.registry import default_registry
from kvpress_lab.spec import load_policy
from kvpress_lab.testing.tiny import tiny_model

KEEP_RATIO = 0.25
QUESTION_TOKENS = 16
NEW_TOKENS = 8
ALL_LENGTHS = "4096,8192,16384,32768,65536,131072"
PROBE_PROMPT = 128  # bound on a probe's prompt tokens (KVzip: the repeat instruction and overlap)
EXCLUDED_PLUGINS = ("kvpress_bridge",)  # kvpress's own presses, benchmarked by kvpress


def lengths() -> list[int]:
    return [int(x) for x in os.environ.get("KVLAB_BENCH_LENGTHS", ALL_LENGTHS).split(",") if x]


def out_path() -> Path:
    return Path(os.environ.get("KVLAB_BENCH_SCALING_OUT", "notes/bench-scaling.json"))


def shipped_policies() -> list[str]:
    reg = default_registry()
    return [
        n for n in reg.names("policy") if reg.get("policy", n).plugin.name not in EXCLUDED_PLUGINS
    ]


def spec_for(name: str) -> str:
    cls = default_registry().get("policy", name).cls
    field = attrs.fields_dict(cls).get("keep_ratio")
    return f"{name}:keep_ratio={KEEP_RATIO}" if field is not None and field.init else name


def expected_peak_kv(name: str, length: int) -> tuple[str, int]:
    """The stated growth law of the peak KV slots and its value at ``length``."""
    policy = load_policy(spec_for(name))
    comp = policy.compose()
    block = comp.engine.block_size
    probing = any(type(s).probes is not Scorer.probes for s in comp.scorers.values())
    if probing:  # one probe (a context chunk and its prompt) is fed over the full cache
        chunk = min(length, getattr(policy, "chunk_size", None) or length)
        return "L + Q + C + p (C=chunk)", length + QUESTION_TOKENS + chunk + PROBE_PROMPT
    if block is None or block >= length:
        return "L + Q", length + QUESTION_TOKENS
    ratio = KEEP_RATIO if spec_for(name) != name else 1.0
    return f"r L + S + Q (S={block})", int(ratio * length) + block + QUESTION_TOKENS


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process; False where that is impossible.

    Memory the previous cell freed is first handed back to the kernel (glibc ``malloc_trim``):
    otherwise the next run reuses it without the resident size growing, and its growth reads 0.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_rss_bytes() -> int:
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB, never reset


def long_context_tiny(layers: int = 2):
    """The benchmarks' tiny long-context Llama: 4 query / 2 KV heads of 64 dims, 128k positions.

    A 131072-token context is followed by the question, the answer and (KVzip) a probe of up to
    a chunk and its prompt: the model takes 4096 positions more than the longest context.
    """
    return tiny_model(
        layers=layers,
        heads=4,
        kv_heads=2,
        head_dim=64,
        hidden_size=256,
        intermediate_size=512,
        max_position_embeddings=131072 + 4096,
    )


@pytest.fixture(scope="module")
def lm():
    return long_context_tiny()


def run_cell(lm, name: str, length: int) -> dict:
    gen = torch.Generator().manual_seed(length)
    seg = PromptSegments(
        context_ids=torch.randint(3, 253, (length,), generator=gen),
        question_ids=torch.randint(3, 253, (QUESTION_TOKENS,), generator=gen),
    )
    law, bound = expected_peak_kv(name, length)
    row = {"policy": name, "spec": spec_for(name), "length": length, "expected_peak_kv": law}
    row["expected_peak_kv_tokens"] = bound
    resettable = _reset_peak_rss()
    rss_before = _status_bytes("VmRSS") or 0  # the process (torch, model) before the run
    t0 = time.perf_counter()
    try:
        res = run_segments(lm, load_policy(spec_for(name)), seg, max_new_tokens=NEW_TOKENS)
    except Exception as err:  # recorded: a cell that cannot run is named with its reason
        row["error"] = f"{type(err).__name__}: {err}"
        row["traceback"] = traceback.format_exc(limit=3)
        return row
    row.update(
        wall_s=round(time.perf_counter() - t0, 4),
        prefill_s=round(res.prefill_s, 4),
        compress_s=round(res.compress_s, 4),
        decode_s=round(res.decode_s, 4),
        peak_rss_bytes=_peak_rss_bytes(),
        peak_rss_reset=resettable,
        rss_before_bytes=rss_before,
        peak_rss_growth_bytes=_peak_rss_bytes() - rss_before,
        peak_kv_tokens=res.peak_kv_tokens,
        peak_kv_bytes=res.peak_kv_bytes,
        kept_tokens=round(res.kept_tokens, 2),  # mean per layer and KV head (ragged: unequal)
        kept_total=res.kept_total,
        torch_threads=torch.get_num_threads(),
    )
    return row


def _save(rows: list[dict]) -> None:
    path = out_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()) if path.exists() else []
    done = {(r["policy"], r["length"]) for r in rows}
    kept = [r for r in old if (r["policy"], r["length"]) not in done]
    path.write_text(json.dumps(kept + rows, indent=1) + "\n")


@pytest.mark.parametrize("name", shipped_policies())
def test_bench_scaling(lm, name, benchmark):
    rows: list[dict] = []

    def sweep() -> None:
        for length in lengths():
            row = run_cell(lm, name, length)
            rows.append(row)
            print("\n" + json.dumps({k: v for k, v in row.items() if k != "traceback"}))
            _save([row])  # kept even if a later, longer cell kills the process

    benchmark.pedantic(sweep, rounds=1, iterations=1)
    benchmark.extra_info["rows"] = rows
    ran = [r for r in rows if "error" not in r]
    for r in ran:  # the peak KV law is exact arithmetic, not a timing: it must hold
        assert r["peak_kv_tokens"] <= r["expected_peak_kv_tokens"], r
