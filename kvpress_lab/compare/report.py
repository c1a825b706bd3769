"""Summaries (Markdown, CSV) and plots (PNG, matplotlib's Agg backend) of comparison rows."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

__all__ = ["FAIRNESS_TOLERANCE", "PLOTS", "summarize", "write_plots", "write_summary"]

FAIRNESS_TOLERANCE = 0.01  # kept tokens may differ from the target by at most 1 %
PLOTS = ("accuracy_vs_keep.png", "accuracy_vs_length.png", "accuracy_vs_kv_memory.png")
MIB = 2**20

COLUMNS = (
    "policy",
    "task",
    "length",
    "keep",
    "n",
    "accuracy",
    "full_accuracy",
    "kept_tokens",
    "target_tokens",
    "kept_vs_target",
    "fair",
    "kv_kept_mib",
    "kv_full_mib",
    "peak_kv_mib",
    "prefill_s",
    "compress_s",
    "decode_s",
    "decode_tok_s",
    "shared_prefill",
)


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def summarize(rows: list[dict]) -> list[dict]:
    """One line per policy x task x length x keep, the full-cache accuracy beside each."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["spec"], r["task"], r["target_length"], r["keep_ratio"])].append(r)
    full_acc = {
        (task, length): _mean(x["score"] for x in g)
        for (spec, task, length, _), g in groups.items()
        if spec == "full"
    }
    out = []
    for (spec, task, length, keep), g in groups.items():
        kept = _mean(x["kept_tokens"] for x in g)
        target = _mean(x["target_tokens"] for x in g)
        worst = max(
            abs(x["kept_tokens"] - x["target_tokens"]) / max(1, x["target_tokens"]) for x in g
        )
        out.append(
            {
                "policy": spec,
                "task": task,
                "length": length,
                "keep": keep,
                "n": len(g),
                "accuracy": _mean(x["score"] for x in g),
                "full_accuracy": full_acc.get((task, length), float("nan")),
                "kept_tokens": kept,
                "target_tokens": target,
                "kept_vs_target": worst,
                "fair": worst <= FAIRNESS_TOLERANCE,
                "kv_kept_mib": _mean(x["kv_bytes_kept"] for x in g) / MIB,
                "kv_full_mib": _mean(x["kv_bytes_full"] for x in g) / MIB,
                "peak_kv_mib": _mean(x["peak_kv_bytes"] for x in g) / MIB,
                "prefill_s": _mean(x["prefill_s"] for x in g),
                "compress_s": _mean(x["compress_s"] for x in g),
                "decode_s": _mean(x["decode_s"] for x in g),
                "decode_tok_s": _mean(x["decode_tokens_per_s"] for x in g),
                "shared_prefill": _mean(float(x["shared_prefill"]) for x in g),
            }
        )
    out.sort(
        key=lambda s: (
            s["task"],
            s["length"],
            -(s["keep"] if s["keep"] is not None else 2.0),
            s["policy"] != "full",
            s["policy"],
        )
    )
    return out


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def write_summary(out: Path, rows: list[dict], metadata: dict) -> list[dict]:
    """Write ``summary.csv`` and ``summary.md``; returns the summary lines."""
    summary = summarize(rows)
    with (out / "summary.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for s in summary:
            writer.writerow({k: ("" if s[k] is None else s[k]) for k in COLUMNS})

    unfair = [s for s in summary if not s["fair"]]
    lines = [
        "# KV-cache policy comparison",
        "",
        f"- model: `{metadata.get('model')}` on {metadata.get('device')}",
        f"- protocol: {metadata.get('protocol')}; seed {metadata.get('seed')}; "
        f"greedy decoding, at most {metadata.get('max_new_tokens')} new tokens",
        f"- command: `{metadata.get('command')}`",
        f"- rows: {len(rows)}",
        "",
        "Accuracy is the mean task score (1.0 = right). `full` is the uncompressed cache; "
        "`full acc` repeats its accuracy on the same samples. `kept` and `target` are context "
        "tokens per layer and KV head; KV MiB is the compressed cache, peak KV the most held "
        "during prefill. Times are means per row in seconds: `compress` is the policy's scoring "
        "and selection, `decode` feeds the question and generates the answer (tok/s = answer "
        "tokens / decode s). With a shared prefill (`shared` = fraction of rows that used one) "
        "`prefill` is the one forward pass all sharing policies of a sample started from, "
        "counted on each of their rows.",
        "",
        "| policy | task | length | keep | n | accuracy | full acc | kept | target | fair "
        "| KV MiB | peak KV MiB | prefill s | compress s | decode s | decode tok/s | shared |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|:-:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        lines.append(
            "| "
            + " | ".join(
                [
                    f"`{s['policy']}`",
                    s["task"],
                    str(s["length"]),
                    "1 (full)" if s["keep"] is None else _fmt(s["keep"], 3).rstrip("0"),
                    str(s["n"]),
                    _fmt(s["accuracy"]),
                    _fmt(s["full_accuracy"]),
                    _fmt(s["kept_tokens"], 1),
                    _fmt(s["target_tokens"], 1),
                    "yes" if s["fair"] else "**NO**",
                    _fmt(s["kv_kept_mib"]),
                    _fmt(s["peak_kv_mib"]),
                    _fmt(s["prefill_s"]),
                    _fmt(s["compress_s"], 3),
                    _fmt(s["decode_s"]),
                    _fmt(s["decode_tok_s"], 1),
                    _fmt(s["shared_prefill"]),
                ]
            )
            + " |"
        )
    lines.append("")
    if unfair:
        lines.append("## Fairness warnings")
        lines.append("")
        for s in unfair:
            lines.append(
                f"- `{s['policy']}` on {s['task']} at {s['length']} tokens, keep {s['keep']}: "
                f"kept {s['kept_tokens']:.1f} tokens against a target of {s['target_tokens']:.1f} "
                f"(off by up to {s['kept_vs_target']:.1%}, more than "
                f"{FAIRNESS_TOLERANCE:.0%}); its accuracy is not comparable at this setting."
            )
    else:
        lines.append(
            f"Fairness: every policy kept its target token count within {FAIRNESS_TOLERANCE:.0%}."
        )
    lines.append("")
    (out / "summary.md").write_text("\n".join(lines), encoding="utf-8")
    return summary


def write_plots(out: Path, summary: list[dict]) -> list[Path]:
    """Accuracy vs keep ratio (per task), vs context length (per task), vs KV memory."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    tasks = sorted({s["task"] for s in summary})
    policies = sorted({s["policy"] for s in summary if s["policy"] != "full"})
    paths = [out / name for name in PLOTS]

    def panels(title: str):
        fig, axes = plt.subplots(
            1, len(tasks), figsize=(4.2 * len(tasks) + 1, 3.6), squeeze=False, sharey=True
        )
        fig.suptitle(title)
        return fig, axes[0]

    def avg(items, key):
        return _mean(s[key] for s in items)

    # accuracy vs keep ratio, averaged over lengths
    fig, axes = panels("Accuracy vs keep ratio (mean over lengths)")
    for ax, task in zip(axes, tasks, strict=True):
        for pol in policies:
            keeps = sorted(
                {
                    s["keep"]
                    for s in summary
                    if s["task"] == task and s["policy"] == pol and s["keep"] is not None
                }
            )  # a spec with its own token budget has no keep ratio to plot against
            ys = [
                avg(
                    [
                        s
                        for s in summary
                        if s["task"] == task and s["policy"] == pol and s["keep"] == k
                    ],
                    "accuracy",
                )
                for k in keeps
            ]
            ax.plot(keeps, ys, marker="o", label=pol)
        full = [s for s in summary if s["task"] == task and s["policy"] == "full"]
        if full:
            ax.axhline(avg(full, "accuracy"), color="black", ls="--", lw=1, label="full")
        ax.set_title(task)
        ax.set_xlabel("keep ratio")
        ax.set_ylim(-0.05, 1.05)
    axes[0].set_ylabel("accuracy")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    # accuracy vs context length, one line per policy and keep ratio
    fig, axes = panels("Accuracy vs context length")
    for ax, task in zip(axes, tasks, strict=True):
        lines = sorted(
            {(s["policy"], s["keep"]) for s in summary if s["task"] == task},
            key=lambda pk: (pk[0] != "full", pk[0], -(pk[1] or 2.0)),
        )
        for pol, keep in lines:
            pts = sorted(
                (s["length"], s["accuracy"])
                for s in summary
                if s["task"] == task and s["policy"] == pol and s["keep"] == keep
            )
            label = pol if keep is None else f"{pol} @{keep:g}"
            style = {"color": "black", "ls": "--"} if pol == "full" else {}
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label, **style)
        ax.set_title(task)
        ax.set_xlabel("context tokens")
        ax.set_ylim(-0.05, 1.05)
    axes[0].set_ylabel("accuracy")
    axes[-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)

    # accuracy vs KV memory, one point per policy x keep (mean over tasks and lengths)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for pol in ["full", *policies]:
        keeps = sorted(
            {s["keep"] for s in summary if s["policy"] == pol}, key=lambda k: -(k or 2.0)
        )
        xs, ys = [], []
        for k in keeps:
            items = [s for s in summary if s["policy"] == pol and s["keep"] == k]
            xs.append(avg(items, "kv_kept_mib"))
            ys.append(avg(items, "accuracy"))
        style = {"color": "black", "marker": "s"} if pol == "full" else {"marker": "o"}
        ax.plot(xs, ys, label=pol, **style)
    ax.set_xlabel("KV cache kept (MiB, mean)")
    ax.set_ylabel("accuracy (mean over tasks and lengths)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Accuracy vs KV memory")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[2], dpi=100)
    plt.close(fig)
    return paths
