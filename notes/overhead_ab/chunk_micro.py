# ruff: noqa
import sys, time, statistics, torch

sys.path.insert(0, "/tmp/overhead/old")
import old_chunkkv
from kvlab_plugins import chunkkv
from kvpress_lab.selection import reduce_scores

torch.set_num_threads(2)
N, Q, H = 3981, 19, 3
g = torch.Generator().manual_seed(0)
pos = torch.cat([torch.arange(N - Q), torch.full((Q,), -1)]).expand(1, H, N)
cand = torch.ones(1, 1, N, dtype=torch.bool)
cand[..., -32:] = False
raw = torch.rand(1, H, N, generator=g)
k = int(0.25 * (N - Q)) - 13


def run(mod):
    s = reduce_scores(raw, "layer")
    return mod.chunk_select(s, pos, cand, k, 20)


a, b = run(old_chunkkv), run(chunkkv)
print("equal", torch.equal(a, b))
t = {"old": [], "new": []}
for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 200):
    for lab, m in (("old", old_chunkkv), ("new", chunkkv)):
        t0 = time.process_time()
        run(m)
        t[lab].append(time.process_time() - t0)
print({k_: f"{1e3 * statistics.median(v):.3f} ms cpu" for k_, v in t.items()})
from torch.profiler import profile, ProfilerActivity

with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(30):
        run(chunkkv)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
