# ruff: noqa
"""compress_s / prefill_s at ~4k tokens, default model; old vs new plugin code interleaved.
usage: engine_bench.py ROUNDS policy@old,policy@new,...   (old = code of commit 44b202d)"""

import sys, time, statistics, os, importlib, torch

sys.path.insert(0, "/tmp/overhead/old")
sys.path.insert(0, "/work/main/benchmarks")
from test_bench_laserkv import segments_near
from kvpress_lab.models import load_model
from kvpress_lab.engine.runner import prefill_and_compress
from kvpress_lab.spec import load_policy
from kvlab_plugins import expected_attention as ea, chunkkv as ck, h2o
import old_expected_attention as oea, old_chunkkv as ock, old_h2o as oh

NEW = {
    "ea": (ea.ExpectedAttentionScorer, "observe", ea.ExpectedAttentionScorer.observe),
    "ck": (ck.ChunkSelector, "select", ck.ChunkSelector.select),
    "h2o": (h2o.H2OScorer, "observe", h2o.H2OScorer.observe),
}
OLD = {
    "ea": oea.ExpectedAttentionScorer.observe,
    "ck": ock.ChunkSelector.select,
    "h2o": oh.H2OScorer.observe,
}


def use(version):
    for key, (cls, attr, fn) in NEW.items():
        setattr(cls, attr, OLD[key] if version == "old" else fn)


rounds = int(sys.argv[1])
variants = sys.argv[2].split(",")
lm = load_model()
seg = segments_near(lm, 4096)
print("tokens", seg.context_length + seg.question_length, flush=True)
res = {v: [] for v in variants}
name, ver = variants[0].split("@")
use(ver)  # warm-up (first-call allocations), not counted
prefill_and_compress(lm, load_policy(f"{name}:keep_ratio=0.25"), seg)
for r in range(rounds):
    for v in variants:
        name, ver = v.split("@")
        use(ver)
        c0 = time.process_time()
        st = prefill_and_compress(lm, load_policy(f"{name}:keep_ratio=0.25"), seg)
        res[v].append((st.prefill_s, st.compress_s, time.process_time() - c0))
        print(
            f"round {r} {v:28} prefill {st.prefill_s:7.2f}s compress {st.compress_s:7.3f}s ratio {100 * st.compress_s / st.prefill_s:6.2f}%  load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
print("median ratios (wall compress/prefill):")
for v, xs in res.items():
    print(
        f"  {v:28} {100 * statistics.median(c / p for p, c, _ in xs):6.2f}%  (rounds: {', '.join(f'{100 * c / p:.2f}' for p, c, _ in xs)})"
    )
