# ruff: noqa
"""expected_attention at ~4k tokens on the default model: queries recomputed (old) vs the
forward pass's own projection (new), interleaved in one process.
usage: [THREADS=n] ea_projected.py ROUNDS   (torch threads, default: torch's own)

"old" is the same scorer with needs_projected_queries switched off: the observer then keeps no
projection and LayerObservation.projected_queries recomputes it through adapter.project_queries,
exactly the code path before the change. Reports per run: prefill_s and compress_s (wall, as the
engine measures them) and the CPU time (all threads) spent inside the scorer's observe; and
checks that both variants keep the same indices."""

import os, statistics, sys, time

import torch

sys.path.insert(0, "/work/main/benchmarks")
from test_bench_laserkv import segments_near
from kvlab_plugins.expected_attention import ExpectedAttentionScorer
from kvpress_lab.engine.runner import prefill_and_compress
from kvpress_lab.models import load_model
from kvpress_lab.spec import load_policy

observe = ExpectedAttentionScorer.observe
cpu = [0.0]


def timed_observe(self, obs):
    c0 = time.process_time()
    try:
        return observe(self, obs)
    finally:
        cpu[0] += time.process_time() - c0


ExpectedAttentionScorer.observe = timed_observe


def one(version):
    ExpectedAttentionScorer.needs_projected_queries = version == "new"
    cpu[0] = 0.0
    st = prefill_and_compress(lm, load_policy("expected_attention:keep_ratio=0.25"), seg)
    return st, cpu[0]


if "THREADS" in os.environ:
    torch.set_num_threads(int(os.environ["THREADS"]))
rounds = int(sys.argv[1])
lm = load_model()
seg = segments_near(lm, 4096)
print("tokens", seg.context_length + seg.question_length, "threads", torch.get_num_threads())
one("new")  # warm-up, not counted
res = {"old": [], "new": []}
kept = {}
for r in range(rounds):
    for v in ("old", "new") if r % 2 == 0 else ("new", "old"):
        st, c = one(v)
        kept.setdefault(v, st.context_index)
        res[v].append((st.prefill_s, st.compress_s, c))
        print(
            f"round {r} {v}: prefill {st.prefill_s:6.2f}s compress {st.compress_s:6.3f}s "
            f"ratio {100 * st.compress_s / st.prefill_s:5.2f}%  observe CPU {c:6.3f}s  "
            f"load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
print("same kept indices:", torch.equal(kept["old"], kept["new"]))
med = {
    v: [statistics.median(x[i] for x in xs) for i in range(3)]
    + [statistics.median(x[1] / x[0] for x in xs)]
    for v, xs in res.items()
}
for v, (p, c, o, ratio) in med.items():
    print(
        f"median {v}: prefill {p:.2f}s compress {c:.3f}s observe CPU {o:.3f}s ratio {100 * ratio:.2f}%"
    )
print(
    f"new/old: compress {med['new'][1] / med['old'][1]:.3f}, observe CPU "
    f"{med['new'][2] / med['old'][2]:.3f}, compress/prefill ratio {med['new'][3] / med['old'][3]:.3f}; "
    f"prefill {med['new'][0] / med['old'][0]:.3f}"
)
# per-round paired ratios (the box's load drifts; pairs are adjacent runs)
pairs = [n[1] / o[1] for o, n in zip(res["old"], res["new"])]
print("paired compress new/old per round:", ", ".join(f"{x:.3f}" for x in pairs))
