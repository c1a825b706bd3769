"""Summaries (Markdown, CSV) and plots (PNG, matplotlib's Agg backend) of comparison rows.

Every accuracy carries a 95 % interval and every policy is compared, sample by sample, with the
full cache and with the first listed policy (:mod:`kvpress_lab.compare.stats`). Fairness is
judged against the policy-independent target each row records (``floor(keep_ratio * L)`` or
``budget``); a cell that misses it by more than 1 % is marked unfair and its verdicts say so
instead of ranking it.

Several questions over one context (rows with a ``question_index``) are scored one row per
question, and a sample's score is the mean of its questions' scores: the unit of ``n``, of the
intervals and of the paired comparisons is the sample (the context), since questions over one
context are not independent. RULER's tasks keep RULER's scoring (``niah_multiquery`` asks its
four keys in one question, scored with ``string_match_all``). Rows of a task group (``ruler``)
also add up to one line per group, whose samples are every member task's samples.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

from kvpress_lab.compare.stats import CONFIDENCE, Interval, mean_interval, paired_comparison

__all__ = [
    "FAIRNESS_TOLERANCE",
    "PLOTS",
    "policy_colors",
    "summarize",
    "tighter_intervals_hint",
    "write_plots",
    "write_summary",
]

FAIRNESS_TOLERANCE = 0.01  # kept tokens may differ from the target by at most 1 %
PLOTS = ("accuracy_vs_keep.png", "accuracy_vs_length.png", "accuracy_vs_kv_memory.png")
PLOT_DPI = 200
MIB = 2**20
UNFAIR = "not comparable: unfair budget"

COLUMNS = (
    "policy",
    "task",
    "length",
    "keep",
    "n",
    "questions",
    "accuracy",
    "accuracy_low",
    "accuracy_high",
    "interval",
    "full_accuracy",
    "vs_full",
    "vs_full_low",
    "vs_full_high",
    "vs_full_n",
    "vs_full_verdict",
    "reference",
    "vs_reference",
    "vs_reference_low",
    "vs_reference_high",
    "vs_reference_n",
    "vs_reference_verdict",
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
    "prefills_per_sample",
    "kept_layer_min",
    "kept_layer_max",
)


def kept_off_target(row: dict) -> float:
    """How far a row's kept tokens are from its target, as a fraction of the target.

    Compares the total over layers and KV heads with the uniform budget's total
    (``target_tokens x kv_rows``), so per-layer and per-head allocations (PyramidKV, Ada-KV)
    are fair when their totals match; rows written before the total was recorded compare the
    mean per layer and head, which is the same quantity divided by ``kv_rows``.
    """
    if row.get("kept_total") is not None and row.get("kv_rows"):
        target = row["target_tokens"] * row["kv_rows"]
        return abs(row["kept_total"] - target) / max(1, target)
    return abs(row["kept_tokens"] - row["target_tokens"]) / max(1, row["target_tokens"])


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def _first_policy(rows: list[dict], metadata: dict | None) -> str | None:
    """The first policy the user listed: from the metadata's plan, else the rows' order."""
    for entry in (metadata or {}).get("resolved_policies") or []:
        if entry.get("spec") != "full":
            return entry["spec"]
    for r in rows:
        if r["spec"] != "full":
            return r["spec"]
    return None


def _scores(group: list[dict]) -> dict:
    """Scores by sample: the mean over a sample's question rows (rows without a sample id pair
    by their position in the cell; a group's samples are told apart by their task)."""
    by: dict = defaultdict(list)
    for i, r in enumerate(group):
        by[(r["task"], r.get("sample_id", i))].append(float(r["score"]))
    return {sample: sum(v) / len(v) for sample, v in by.items()}


def _paired(cell: dict[str, float], ref: dict[str, float]):
    common = sorted(set(cell) & set(ref))
    return paired_comparison([cell[s] for s in common], [ref[s] for s in common])


def summarize(rows: list[dict], reference: str | None = None) -> list[dict]:
    """One line per policy x task x length x keep, with intervals and paired comparisons.

    ``reference`` is the policy every other one is also compared with (default: the first
    non-full policy in ``rows``). Rows marked ``failed`` are left out.
    """
    rows = [r for r in rows if not r.get("failed")]
    reference = reference or _first_policy(rows, None)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    order: dict[str, int] = {}
    for r in rows:
        groups[(r["spec"], r["task"], r["target_length"], r["keep_ratio"])].append(r)
        if r.get("task_group"):  # the group's line: every member task's rows together
            groups[(r["spec"], r["task_group"], r["target_length"], r["keep_ratio"])].append(r)
        order.setdefault(r["spec"], len(order))

    cells: dict[tuple, dict] = {}
    for key, g in groups.items():
        target = _mean(x["target_tokens"] for x in g)
        worst = max(kept_off_target(x) for x in g)
        cells[key] = {"scores": _scores(g), "fair": worst <= FAIRNESS_TOLERANCE, "worst": worst}
        cells[key]["target"] = target

    full = {(t, n): c for (spec, t, n, _), c in cells.items() if spec == "full"}
    out = []
    for key, g in groups.items():
        spec, task, length, keep = key
        cell = cells[key]
        acc = mean_interval(list(cell["scores"].values()))
        line = {
            "policy": spec,
            "task": task,
            "length": length,
            "keep": keep,
            # a member task of a group line (the plots show the group, the tables both)
            "task_group": g[0].get("task_group") if g[0].get("task_group") != task else None,
            "n": len(cell["scores"]),
            "questions": len(g),
            "accuracy": acc.estimate,
            "accuracy_low": acc.low,
            "accuracy_high": acc.high,
            "interval": acc.method,
            "full_accuracy": float("nan"),
            "reference": reference,
            "kept_tokens": _mean(x["kept_tokens"] for x in g),
            "target_tokens": cell["target"],
            "kept_vs_target": cell["worst"],
            "fair": cell["fair"],
            "kv_kept_mib": _mean(x["kv_bytes_kept"] for x in g) / MIB,
            "kv_full_mib": _mean(x["kv_bytes_full"] for x in g) / MIB,
            "peak_kv_mib": _mean(x["peak_kv_bytes"] for x in g) / MIB,
            "prefill_s": _mean(x["prefill_s"] for x in g),
            "compress_s": _mean(x["compress_s"] for x in g),
            "decode_s": _mean(x["decode_s"] for x in g),
            "decode_tok_s": _mean(x["decode_tokens_per_s"] for x in g),
            "shared_prefill": _mean(float(x["shared_prefill"]) for x in g),
            # rows before the counter existed ran one prefill each
            "prefills_per_sample": sum(x.get("prefills", 1) for x in g) / len(cell["scores"]),
            # kept tokens per layer (mean over KV heads): lowest and highest layer of any row
            "kept_layer_min": min(x.get("kept_layer_min", x["kept_tokens"]) for x in g),
            "kept_layer_max": max(x.get("kept_layer_max", x["kept_tokens"]) for x in g),
        }
        full_cell = full.get((task, length))
        if full_cell is not None:
            line["full_accuracy"] = mean_interval(list(full_cell["scores"].values())).estimate
        ref_cell = cells.get((reference, task, length, keep))
        for prefix, other, skip in (
            ("vs_full", full_cell, spec == "full"),
            ("vs_reference", ref_cell, spec in ("full", reference)),
        ):
            line.update(_versus(prefix, cell, other, skip))
        out.append(line)
    out.sort(
        key=lambda s: (
            s["task"],
            s["length"],
            -(s["keep"] if s["keep"] is not None else 2.0),
            s["policy"] != "full",
            order.get(s["policy"], 0),
        )
    )
    return out


def _versus(prefix: str, cell: dict, other: dict | None, skip: bool) -> dict:
    empty = {
        prefix: float("nan"),
        f"{prefix}_low": float("nan"),
        f"{prefix}_high": float("nan"),
        f"{prefix}_n": 0,
        f"{prefix}_verdict": "",
    }
    if skip or other is None:
        return empty
    cmp = _paired(cell["scores"], other["scores"])
    verdict = cmp.verdict
    if not cell["fair"]:
        verdict = UNFAIR
    elif not other["fair"]:
        verdict = "not comparable: the reference's budget is unfair"
    return {
        prefix: cmp.difference.estimate,
        f"{prefix}_low": cmp.difference.low,
        f"{prefix}_high": cmp.difference.high,
        f"{prefix}_n": cmp.difference.n,
        f"{prefix}_verdict": verdict,
    }


# ---- text ------------------------------------------------------------------------------------
def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _with_interval(estimate: float, low: float, high: float, signed: bool = False) -> str:
    if math.isnan(estimate):
        return "-"
    f = (lambda v: f"{v:+.2f}") if signed else (lambda v: f"{v:.2f}")
    if math.isnan(low) or math.isnan(high):
        return f"{f(estimate)} [-]"
    return f"{f(estimate)} [{f(low)}, {f(high)}]"


def _answer_length(max_new_tokens: int | None, rows: list[dict]) -> str:
    """The answer length limit: the one given, else each task's (as its rows recorded)."""
    if max_new_tokens is not None:
        return f"{max_new_tokens} new tokens"
    per_task = {r["task"]: r["max_new_tokens"] for r in rows if "max_new_tokens" in r}
    if len(set(per_task.values())) == 1:
        return f"{next(iter(per_task.values()))} new tokens (per task: its own or the default)"
    listed = ", ".join(f"{t} {n}" for t, n in sorted(per_task.items()))
    return f"each task's own number of new tokens ({listed})"


def _n(s: dict) -> str:
    """``n``, with the question rows behind it where a sample asked several questions."""
    return str(s["n"]) if s["questions"] == s["n"] else f"{s['n']} ({s['questions']} q)"


def _keep(s: dict) -> str:
    return "1 (full)" if s["keep"] is None else _fmt(s["keep"], 3).rstrip("0").rstrip(".")


def tighter_intervals_hint(summary: list[dict], out: Path | None = None) -> str:
    """How many samples would halve the widest accuracy interval of this run, and how to run them."""
    widths = [
        (Interval(s["accuracy"], s["accuracy_low"], s["accuracy_high"], s["n"], "").half_width, s)
        for s in summary
        if not math.isnan(s["accuracy_low"]) and not math.isnan(s["accuracy_high"])
    ]
    if not widths:
        return "Intervals need at least two samples per cell: rerun with more --samples."
    width, s = max(widths, key=lambda w: w[0])
    n = s["n"]
    where = f"--out {out} --extend" if out is not None else "the same --out and --extend"
    return (
        f"Tighter intervals: the widest 95% interval here is +/-{width:.2f} "
        f"({s['policy']}, {s['task']} {s['length']}, n={n}). Interval widths shrink like "
        f"1/sqrt(n): --samples {4 * n} roughly halves them, --samples {16 * n} quarters them; "
        f"rerun the same command with --samples {4 * n} and {where} to reuse the rows already "
        "computed."
    )


def write_summary(out: Path, rows: list[dict], metadata: dict) -> list[dict]:
    """Write ``summary.csv`` and ``summary.md``; returns the summary lines."""
    reference = _first_policy(rows, metadata)
    summary = summarize(rows, reference)
    with (out / "summary.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for s in summary:
            writer.writerow({k: ("" if s[k] is None else s[k]) for k in COLUMNS})

    conf = f"{CONFIDENCE:.0%}"
    ref = f"`{reference}`" if reference else "the first policy"
    unfair = [s for s in summary if not s["fair"]]
    lines = [
        "# KV-cache policy comparison",
        "",
        f"- model: `{metadata.get('model')}` on {metadata.get('device')}",
        f"- protocol: {metadata.get('protocol')}; seed {metadata.get('seed')}; "
        f"greedy decoding, at most {_answer_length(metadata.get('max_new_tokens'), rows)}",
        f"- command: `{metadata.get('command')}`",
        f"- rows: {len(rows)}",
        "",
        f"Accuracy is the mean task score (1.0 = right) over the cell's n samples, with its {conf} "
        "interval in brackets: Wilson for 0/1 scores, a bootstrap of the mean for partial credit. "
        "Every policy runs on the same samples, so differences are paired per sample: "
        f"`vs full` is the policy's accuracy minus the full cache's, `vs {reference}` minus "
        f"{ref}'s at the same keep ratio, each with a paired-bootstrap {conf} interval. The "
        "verdict says better or worse only when that interval excludes 0 and an exact sign test "
        "on the samples where the two differ agrees; otherwise there is no detectable "
        "difference at that n. `kept` and `target` are context tokens per layer and KV head; "
        "the target is floor(keep ratio x context) for every policy alike, and a cell more "
        f"than {FAIRNESS_TOLERANCE:.0%} off it is unfair and not ranked. Where a sample asks "
        "several questions over its context, n counts samples (`4 (12 q)`: 12 question rows) "
        "and a sample's score is the mean over its questions.",
        "",
        f"| policy | task | length | keep | n | accuracy [{conf}] | vs full [{conf}] | verdict "
        f"vs full | vs {reference} [{conf}] | verdict vs {reference} | kept | target | fair |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---|---:|---:|:-:|",
    ]
    for s in summary:
        cells = [
            f"`{s['policy']}`",
            s["task"],
            str(s["length"]),
            _keep(s),
            _n(s),
            _with_interval(s["accuracy"], s["accuracy_low"], s["accuracy_high"]),
            _with_interval(s["vs_full"], s["vs_full_low"], s["vs_full_high"], signed=True),
            s["vs_full_verdict"] or "-",
            _with_interval(
                s["vs_reference"], s["vs_reference_low"], s["vs_reference_high"], signed=True
            ),
            s["vs_reference_verdict"] or "-",
            _fmt(s["kept_tokens"], 1),
            _fmt(s["target_tokens"], 1),
            "yes" if s["fair"] else "**no**",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Cost",
        "",
        "KV MiB is the compressed cache, peak KV the most held during prefill. Times are means "
        "per row in seconds: `compress` is the policy's scoring and selection, `decode` feeds "
        "the question and generates the answer (tok/s = answer tokens / decode s). With a shared "
        "prefill (`shared` = fraction of rows that used one) `prefill` is the one forward pass "
        "all sharing policies of a sample started from, counted on each of their rows. "
        "`prefills` is the policy's prefills per sample (context): 1 where every question of a "
        "sample was answered from one compressed cache (query-agnostic), one per question where "
        "each question is part of its own prefill (question-aware).",
        "",
        "| policy | task | length | keep | KV MiB | peak KV MiB | prefill s | compress s "
        "| decode s | decode tok/s | shared | prefills |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        cells = [
            f"`{s['policy']}`",
            s["task"],
            str(s["length"]),
            _keep(s),
            _fmt(s["kv_kept_mib"]),
            _fmt(s["peak_kv_mib"]),
            _fmt(s["prefill_s"]),
            _fmt(s["compress_s"], 3),
            _fmt(s["decode_s"]),
            _fmt(s["decode_tok_s"], 1),
            _fmt(s["shared_prefill"]),
            _fmt(s["prefills_per_sample"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    spread = [s for s in summary if s["kept_layer_max"] - s["kept_layer_min"] > 1e-9]
    if spread:
        lines.append(
            "Per-layer budgets: kept/layer min-mean-max (context tokens per layer, mean over KV "
            "heads; fairness compares the total over layers and heads with the uniform total):"
        )
        lines.append("")
        for s in spread:
            lines.append(
                f"- `{s['policy']}` on {s['task']} at {s['length']} tokens, keep {s['keep']}: "
                f"{s['kept_layer_min']:.1f} / {s['kept_tokens']:.1f} / {s['kept_layer_max']:.1f}"
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
    lines += ["", tighter_intervals_hint(summary, out), ""]
    (out / "summary.md").write_text("\n".join(lines), encoding="utf-8")
    return summary


# ---- plots -----------------------------------------------------------------------------------
FULL_COLOR = "#222222"  # near-black, distinct from the black of text and axes


def policy_colors(summary: list[dict]) -> dict[str, str]:
    """One colour per policy for every plot of a run: ``full`` near-black, the rest in table order."""
    import matplotlib

    palette = [matplotlib.colors.to_hex(c) for c in matplotlib.colormaps["tab10"].colors]
    colors = {"full": FULL_COLOR}
    for s in summary:
        if s["policy"] not in colors:
            colors[s["policy"]] = palette[(len(colors) - 1) % len(palette)]
    return colors


def write_plots(out: Path, summary: list[dict]) -> list[Path]:
    """Accuracy vs keep ratio, vs context length and vs KV memory, with 95 % interval bars.

    A task group (``ruler``) is one panel: its member tasks are lines of the tables only. Every
    plot of a run uses the same colour per policy (``full`` in black, drawn on top with
    its own marker so it stays visible where others reach the same accuracy); series at the same
    x are spread a few points apart so their bars do not hide each other; a hollow marker is a
    cell whose budget was unfair.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.transforms import ScaledTranslation

    colors = policy_colors(summary)
    policies = list(colors)
    # a task group's members are in the tables; the plots show the group's line, one panel
    summary = [s for s in summary if not s.get("task_group")]
    tasks = sorted({s["task"] for s in summary})
    lengths = sorted({s["length"] for s in summary})
    keeps = sorted({s["keep"] for s in summary if s["keep"] is not None}, reverse=True)
    paths = [out / name for name in PLOTS]

    def figure(n_rows: int, n_cols: int, title: str):
        fig, axes = plt.subplots(
            n_rows,
            n_cols,
            figsize=(max(6.0, 4.6 * n_cols + 0.6), 3.4 * n_rows + 1.2),
            squeeze=False,
            sharey=True,
            layout="constrained",
        )
        fig.suptitle(title, fontsize=12)
        return fig, axes

    def series(ax, items, x_of, policy, index, count, label=None, marker=None, line=True):
        """One policy's points (sorted by x) with interval bars, dodged by ``index``."""
        items = sorted(items, key=x_of)
        if not items:
            return
        dx = (index - (count - 1) / 2) * 5 / 72  # points -> inches
        trans = ax.transData + ScaledTranslation(dx, 0, ax.figure.dpi_scale_trans)
        color = colors[policy]
        is_full = policy == "full"
        xs = [x_of(s) for s in items]
        ys = [s["accuracy"] for s in items]
        lo = [max(0.0, s["accuracy"] - s["accuracy_low"]) for s in items]
        hi = [max(0.0, s["accuracy_high"] - s["accuracy"]) for s in items]
        lo = [0.0 if math.isnan(v) else v for v in lo]
        hi = [0.0 if math.isnan(v) else v for v in hi]
        ax.errorbar(
            xs,
            ys,
            yerr=[lo, hi],
            transform=trans,
            color=color,
            ls=("--" if is_full else "-") if line else "none",
            lw=1.6,
            marker=marker or ("s" if is_full else "o"),
            ms=6,
            capsize=3,
            elinewidth=1.2,
            zorder=5 if is_full else 3,
            label=label,
        )
        for x, y, s in zip(xs, ys, items, strict=True):
            if not s["fair"]:  # hollow marker: not comparable
                ax.plot([x], [y], transform=trans, marker="o", ms=9, mfc="white", mec=color,
                        mew=1.5, ls="none", zorder=6)  # fmt: skip

    def finish(fig, axes, extra_handles=()):
        for ax in axes.flat:
            ax.set_ylim(-0.08, 1.12)
            ax.axhline(1.0, color="0.85", lw=0.8, zorder=0)
            ax.axhline(0.0, color="0.85", lw=0.8, zorder=0)
            ax.grid(alpha=0.25)
        for row in axes:
            row[0].set_ylabel("accuracy (95% interval)")
        handles = [
            Line2D([], [], color=colors[p], marker="s" if p == "full" else "o",
                   ls="--" if p == "full" else "-", label=p)
            for p in policies
        ]  # fmt: skip
        handles += list(extra_handles)
        if any(not s["fair"] for s in summary):
            handles.append(
                Line2D([], [], color="0.3", marker="o", mfc="white", ls="none",
                       label="hollow: unfair budget")
            )  # fmt: skip
        fig.legend(
            handles=handles,
            loc="outside lower center",
            ncol=min(len(handles), 5),
            fontsize=10,
            frameon=False,
        )

    def pick(**where):
        return [s for s in summary if all(s[k] == v for k, v in where.items())]

    # 1. accuracy vs keep ratio: a panel per task (columns) and length (rows); full at keep 1
    fig, axes = figure(len(lengths), len(tasks), "Accuracy vs keep ratio")
    for i, length in enumerate(lengths):
        for j, task in enumerate(tasks):
            ax = axes[i][j]
            for k, pol in enumerate(policies):
                items = pick(task=task, length=length, policy=pol)
                if pol != "full":
                    items = [s for s in items if s["keep"] is not None]
                series(ax, items, lambda s: 1.0 if s["keep"] is None else s["keep"], pol, k,
                       len(policies))  # fmt: skip
            ax.set_xscale("log")
            ticks = sorted({*keeps, 1.0})
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.set_xlim(ticks[0] / 1.4, 1.4)
            ax.minorticks_off()
            ax.set_title(f"{task}, {length} tokens", fontsize=10)
            ax.set_xlabel("keep ratio (full cache = 1)")
    finish(fig, axes)
    fig.savefig(paths[0], dpi=PLOT_DPI)
    plt.close(fig)

    # 2. accuracy vs context length: a panel per task (columns) and keep ratio (rows)
    rows_of = keeps or [None]
    fig, axes = figure(len(rows_of), len(tasks), "Accuracy vs context length")
    for i, keep in enumerate(rows_of):
        for j, task in enumerate(tasks):
            ax = axes[i][j]
            for k, pol in enumerate(policies):
                items = pick(task=task, policy=pol)
                if pol != "full":
                    items = [s for s in items if s["keep"] == keep]
                series(ax, items, lambda s: s["length"], pol, k, len(policies))
            ax.set_xscale("log", base=2)
            ax.set_xticks(lengths, [str(n) for n in lengths])
            ax.set_xlim(lengths[0] / 1.4, lengths[-1] * 1.4)
            ax.minorticks_off()
            ax.set_title(f"{task}" + ("" if keep is None else f", keep {keep:g}"), fontsize=10)
            ax.set_xlabel("context tokens")
    finish(fig, axes)
    fig.savefig(paths[1], dpi=PLOT_DPI)
    plt.close(fig)

    # 3. accuracy vs KV memory: a panel per task; a line per policy and length through its keeps
    markers = ["o", "^", "D", "v", "P", "X", "*"]
    length_marker = {n: markers[i % len(markers)] for i, n in enumerate(lengths)}
    fig, axes = figure(1, len(tasks), "Accuracy vs KV cache kept")
    for j, task in enumerate(tasks):
        ax = axes[0][j]
        for k, pol in enumerate(policies):
            for length in lengths:
                items = pick(task=task, policy=pol, length=length)
                series(ax, items, lambda s: s["kv_kept_mib"], pol, k, len(policies),
                       marker=length_marker[length])  # fmt: skip
        ax.set_xscale("log")
        mib = [s["kv_kept_mib"] for s in pick(task=task) if s["kv_kept_mib"] > 0]
        if mib:  # dodged artists do not autoscale: set the range from the data
            ax.set_xlim(min(mib) / 1.5, max(mib) * 1.5)
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("KV cache kept (MiB, log scale)")
    extra = [
        Line2D([], [], color="0.3", marker=length_marker[n], ls="none", label=f"{n} tokens")
        for n in lengths
    ]
    finish(fig, axes, extra)
    fig.savefig(paths[2], dpi=PLOT_DPI)
    plt.close(fig)
    return paths
