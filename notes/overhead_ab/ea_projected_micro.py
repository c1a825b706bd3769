# ruff: noqa
"""One default-model layer's expected_attention observe, queries recomputed (old) vs read from a
captured projection (new), CPU time, interleaved, with 4k forwards as the per-layer reference;
then a torch.profiler table of the new one. usage: ea_projected_micro.py REPS"""

import sys, time, statistics, torch
from kvpress_lab.models import load_model
from kvpress_lab.adapters import adapter_for
from kvpress_lab.interfaces import LayerObservation, StepLayout
from kvpress_lab.spec import load_policy
import os

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
lm = load_model()
ad = adapter_for(lm.model)
cfg = lm.model.config
N, Q = 3981, 19
H, D = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
g = torch.Generator().manual_seed(0)
hidden = torch.randn(1, N, cfg.hidden_size, generator=g)
keys = torch.randn(1, H, N, D, generator=g)
values = torch.randn(1, H, N, D, generator=g)
ci = torch.cat([torch.arange(N - Q), torch.full((Q,), -1)]).expand(cfg.num_hidden_layers, H, N)
lay = StepLayout(
    context_length=N - Q,
    block_index=0,
    n_blocks=1,
    block_start=0,
    block_end=N - Q,
    n_past=0,
    n_question=Q,
    context_index=ci,
)
with torch.no_grad():
    proj = ad.query_projection(3)(hidden)
kw = dict(
    layer_idx=3,
    n_layers=cfg.num_hidden_layers,
    adapter=ad,
    hidden=hidden,
    positions=torch.arange(N),
    keys=keys,
    values=values,
    n_past=0,
    question_rows=slice(N - Q, N),
    observation_window=64,
    layout=lay,
)
old = LayerObservation(**kw)
new = LayerObservation(**kw, projection=proj)
sc = load_policy("expected_attention:keep_ratio=0.25").compose().scorers["main"]
t = {"old": [], "new": [], "fwd": []}
ids = torch.randint(100, 10000, (1, N), generator=g)
with torch.no_grad():
    a, b = sc.observe(old), sc.observe(new)
    print("max diff", float((a - b).abs().max()), "max", float(a.abs().max()))
    for i in range(int(sys.argv[1])):
        if i % 3 == 0:
            c0 = time.process_time()
            lm.model(input_ids=ids)
            t["fwd"].append((time.process_time() - c0) / cfg.num_hidden_layers)
        for lab, o in (("old", old), ("new", new)):
            c0 = time.process_time()
            sc.observe(o)
            t[lab].append(time.process_time() - c0)
m = {k: statistics.median(v) for k, v in t.items()}
print(
    {k: f"{1000 * v:.1f} ms" for k, v in m.items()},
    f"old {100 * m['old'] / m['fwd']:.2f}% new {100 * m['new'] / m['fwd']:.2f}% of a layer; new/old {m['new'] / m['old']:.3f}",
)
from torch.profiler import profile, ProfilerActivity

with profile(activities=[ProfilerActivity.CPU]) as prof, torch.no_grad():
    for _ in range(3):
        sc.observe(new)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
