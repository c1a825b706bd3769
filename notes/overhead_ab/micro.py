# ruff: noqa
"""Per-layer scorer time, old vs new, interleaved; optional torch.profiler table.
usage: micro.py SCORER[,SCORER] [reps] [profile]"""

import sys, time, statistics, importlib, torch

sys.path.insert(0, "/tmp/overhead/old")
from kvpress_lab.models import load_model
from kvpress_lab.adapters import adapter_for
from kvpress_lab.interfaces import LayerObservation, StepLayout
from kvpress_lab.spec import load_policy

torch.set_num_threads(2)
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
obs = LayerObservation(
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
mods = {"expected_attention": "expected_attention", "h2o": "h2o"}
reps = int(sys.argv[2]) if len(sys.argv) > 2 else 5
for name in sys.argv[1].split(","):
    new_sc = load_policy(name + ":keep_ratio=0.25").compose().scorers["main"]
    old_mod = importlib.import_module("old_" + mods[name])
    old_cls = [
        c
        for c in vars(old_mod).values()
        if isinstance(c, type) and getattr(c, "name", None) == new_sc.name
    ][0]
    old_sc = old_cls(
        **{
            k: getattr(new_sc, k)
            for k in (
                "query_block",
                "n_future_positions",
                "n_sink",
                "use_covariance",
                "use_vnorm",
                "epsilon",
            )
            if hasattr(new_sc, k)
        }
    )
    t = {"old": [], "new": []}
    ids = torch.randint(100, 10000, (1, N), generator=g)
    fwd = []
    with torch.no_grad():
        a, b = old_sc.observe(obs), new_sc.observe(obs)
        print(
            name,
            "max abs diff",
            float((a - b).abs().max()),
            "max",
            float(a.abs().max()),
            "topk equal",
            bool(
                (
                    a.topk(1000, dim=-1).indices.sort().values
                    == b.topk(1000, dim=-1).indices.sort().values
                ).all()
            ),
        )
        for i in range(reps):
            if i % 3 == 0:
                c0 = time.process_time()
                lm.model(input_ids=ids)
                fwd.append(time.process_time() - c0)
            for lab, sc in (("old", old_sc), ("new", new_sc)):
                t0 = time.process_time()
                sc.observe(obs)
                t[lab].append(time.process_time() - t0)
    mo, mn = statistics.median(t["old"]), statistics.median(t["new"])
    layer = statistics.median(fwd) / cfg.num_hidden_layers
    print(
        f"{name}: CPU time per layer: forward {1000 * layer:.1f} ms (median of {len(fwd)} 4k prefills / {cfg.num_hidden_layers}), observe old {1000 * mo:.1f} ms ({100 * mo / layer:.2f}% of it), new {1000 * mn:.1f} ms ({100 * mn / layer:.2f}%), new/old {mn / mo:.3f}",
        flush=True,
    )
    if len(sys.argv) > 3:
        from torch.profiler import profile, ProfilerActivity

        with profile(activities=[ProfilerActivity.CPU]) as prof, torch.no_grad():
            for _ in range(3):
                new_sc.observe(obs)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
