# ruff: noqa
import sys, time, torch

sys.path.insert(0, "/tmp/overhead/old")
import old_h2o
from kvlab_plugins import h2o
from kvpress_lab.models import load_model
from kvpress_lab.adapters import adapter_for
from kvpress_lab.interfaces import LayerObservation

torch.set_num_threads(2)
lm = load_model()
ad = adapter_for(lm.model)
cfg = lm.model.config
N, Q = 3981, 19
H, D = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
g = torch.Generator().manual_seed(0)
hidden = torch.randn(1, N, cfg.hidden_size, generator=g)
keys = torch.randn(1, H, N, D, generator=g)
obs = LayerObservation(
    layer_idx=3,
    n_layers=cfg.num_hidden_layers,
    adapter=ad,
    hidden=hidden,
    positions=torch.arange(N),
    keys=keys,
    values=keys,
    n_past=0,
    question_rows=slice(N - Q, N),
    observation_window=64,
    layout=None,
)
t = {"old": [], "new": []}
with torch.no_grad():
    for _ in range(2):
        for lab, sc in (("old", old_h2o.H2OScorer()), ("new", h2o.H2OScorer())):
            c0 = time.process_time()
            out = sc.observe(obs)
            t[lab].append(time.process_time() - c0)
            t[lab + "_out"] = out
a, b = t.pop("old_out"), t.pop("new_out")
print(
    "max rel diff",
    float(((a - b).abs() / a.abs()).max()),
    "same top-1000 per head",
    bool(torch.equal(a.topk(1000).indices.sort().values, b.topk(1000).indices.sort().values)),
)
print(
    {k: [round(x * 1000) for x in v] for k, v in t.items()},
    "ms cpu per layer observe; new/old",
    min(t["new"]) / min(t["old"]),
    flush=True,
)
