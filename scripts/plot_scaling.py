"""Plot and tabulate the scaling benchmark (benchmarks/test_bench_scaling.py).

    python scripts/plot_scaling.py [--results notes/bench-scaling.json] [--img docs/img]
        [--table notes/bench-scaling.md]

Writes two log-log plots against the context length L (``scaling-time.svg``: prefill, compress
and decode seconds per policy; ``scaling-memory.svg``: peak KV slots and the growth of the peak
resident memory over the process's memory before the run)
and a markdown file with the per-cell table, the fitted log-log slopes and their check against
the stated law: the peak KV slope must be within 0.1 of the slope of the law evaluated at the
same lengths (a law ``r L + S + Q`` is not a pure power of L, so its own slope is fitted too),
and the prefill slope must lie in [0.9, 2.1] (projections grow like L, attention like L^2).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

SLOPE_TOLERANCE = 0.1
PREFILL_RANGE = (0.9, 2.1)


def slope(lengths: list[int], values: list[float]) -> float | None:
    """Least-squares slope of log(value) against log(L); None with fewer than 2 positive points."""
    pts = [(x, y) for x, y in zip(lengths, values, strict=True) if y > 0]
    if len(pts) < 2:
        return None
    xs, ys = zip(*pts, strict=True)
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def tables(rows: list[dict]) -> str:
    by_policy: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_policy[r["policy"]].append(r)
    out = [
        "| policy | L | prefill s | compress s | decode s | peak RSS MiB (growth) "
        "| peak KV slots | law bound | kept |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    failed = []
    for name in sorted(by_policy):
        for r in sorted(by_policy[name], key=lambda r: r["length"]):
            if "error" in r:
                failed.append(r)
                continue
            out.append(
                f"| `{r['spec']}` | {r['length']} | {r['prefill_s']:.2f} | {r['compress_s']:.2f} "
                f"| {r['decode_s']:.2f} | {r['peak_rss_bytes'] / 2**20:.0f} "
                f"({r.get('peak_rss_growth_bytes', 0) / 2**20:.0f}) "
                f"| {r['peak_kv_tokens']} | {r['expected_peak_kv_tokens']} | {r['kept_tokens']} |"
            )
    out += [
        "",
        "Log-log slopes (time and memory against L) and the check against the stated law:",
        "",
        "| policy | peak KV law | KV slope | law slope | KV check | prefill slope | prefill check "
        "| compress slope | decode slope | RSS growth slope |",
        "|---|---|---:|---:|---|---:|---|---:|---:|---:|",
    ]
    for name in sorted(by_policy):
        ok = sorted((r for r in by_policy[name] if "error" not in r), key=lambda r: r["length"])
        if not ok:
            continue
        ls = [r["length"] for r in ok]
        kv = slope(ls, [r["peak_kv_tokens"] for r in ok])
        law = slope(ls, [r["expected_peak_kv_tokens"] for r in ok])
        pre = slope(ls, [r["prefill_s"] for r in ok])
        kv_ok = kv is not None and law is not None and abs(kv - law) <= SLOPE_TOLERANCE
        pre_ok = pre is not None and PREFILL_RANGE[0] <= pre <= PREFILL_RANGE[1]
        out.append(
            f"| {name} | {ok[-1]['expected_peak_kv']} | {_fmt(kv)} | {_fmt(law)} "
            f"| {'ok' if kv_ok else 'OFF'} | {_fmt(pre)} | {'ok' if pre_ok else 'OFF'} "
            f"| {_fmt(slope(ls, [r['compress_s'] for r in ok]))} "
            f"| {_fmt(slope(ls, [r['decode_s'] for r in ok]))} "
            f"| {_fmt(slope(ls, [r.get('peak_rss_growth_bytes', 0) for r in ok]))} |"
        )
    if failed:
        out += ["", "Cells that did not run:", ""]
        out += [f"- `{r['spec']}` at L={r['length']}: {r['error']}" for r in failed]
    return "\n".join(out) + "\n"


def plot(rows: list[dict], img: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    policies = sorted({r["policy"] for r in ok})
    series = {
        p: sorted((r for r in ok if r["policy"] == p), key=lambda r: r["length"]) for p in policies
    }
    img.mkdir(parents=True, exist_ok=True)
    written = []
    panels = {
        "scaling-time.svg": [
            ("prefill_s", "prefill (s)"),
            ("compress_s", "compress (s)"),
            ("decode_s", "decode, 8 tokens (s)"),
        ],
        "scaling-memory.svg": [
            ("peak_kv_tokens", "peak KV slots per layer"),
            ("peak_rss_growth_bytes", "peak RSS growth during the run (bytes)"),
        ],
    }
    for fname, keys in panels.items():
        fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4.2))
        for ax, (key, label) in zip(axes, keys, strict=True):
            for p in policies:
                xs = [r["length"] for r in series[p]]
                ys = [max(r.get(key, 0), 1e-4) for r in series[p]]
                ax.loglog(xs, ys, marker="o", label=p, base=2)
            ax.set_xlabel("context tokens L")
            ax.set_title(label)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        path = img / fname
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=Path("notes/bench-scaling.json"))
    ap.add_argument("--img", type=Path, default=Path("docs/img"))
    ap.add_argument("--table", type=Path, default=Path("notes/bench-scaling.md"))
    args = ap.parse_args()
    rows = json.loads(args.results.read_text())
    text = tables(rows)
    args.table.write_text(text)
    for path in plot(rows, args.img):
        print(f"wrote {path}")
    print(f"wrote {args.table}\n")
    print(text)


if __name__ == "__main__":
    main()
