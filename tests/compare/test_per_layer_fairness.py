"""Fairness of per-layer and per-head allocations: totals over layers and heads, spread reported.

PyramidKV gives layers different budgets and Ada-KV gives heads different budgets; they are fair
when the total kept over layers and KV heads equals the uniform budget's total (1%).
"""

from __future__ import annotations

import pytest
from tiny import tiny_model

from kvpress_lab.compare import compare
from kvpress_lab.compare.report import kept_off_target, summarize


def _row(spec: str, kept_total: int | None, kv_rows: int = 4, target: int = 20, **extra) -> dict:
    row = {
        "spec": spec,
        "task": "niah",
        "target_length": 600,
        "keep_ratio": 0.5,
        "sample_id": "s0",
        "score": 1.0,
        "kept_tokens": (kept_total if kept_total is not None else target * kv_rows) / kv_rows,
        "target_tokens": target,
        "kv_bytes_kept": 1,
        "kv_bytes_full": 2,
        "peak_kv_bytes": 2,
        "prefill_s": 0.1,
        "compress_s": 0.1,
        "decode_s": 0.1,
        "decode_tokens_per_s": 10.0,
        "shared_prefill": False,
    }
    if kept_total is not None:
        row.update(kept_total=kept_total, kv_rows=kv_rows)
    row.update(extra)
    return row


def test_fairness_compares_the_total_over_layers_and_heads():
    # 80 = 20 x 4 rows: fair whatever the spread; 81 is 1.25 % over the uniform total
    assert kept_off_target(_row("a", 80)) == 0
    assert kept_off_target(_row("a", 81)) == pytest.approx(1 / 80)
    # rows written before the totals existed: the mean per layer and head
    assert kept_off_target(_row("a", None, kept_tokens=21.0)) == pytest.approx(1 / 20)
    rows = [
        _row("pyramid", 80, kept_layer_min=15.0, kept_layer_max=25.0),
        _row("skewed", 81, kept_layer_min=10.0, kept_layer_max=30.5),
        _row("uniform", 80, kept_layer_min=20.0, kept_layer_max=20.0),
    ]
    summary = {s["policy"]: s for s in summarize(rows, reference="uniform")}
    assert summary["pyramid"]["fair"] and summary["uniform"]["fair"]
    assert not summary["skewed"]["fair"]
    assert (summary["pyramid"]["kept_layer_min"], summary["pyramid"]["kept_layer_max"]) == (
        15.0,
        25.0,
    )


def test_compare_reports_the_per_layer_spread_of_adaptive_policies(tmp_path):
    lm = tiny_model("llama", layers=4)
    res = compare(
        ["pyramidkv", "snapkv"],
        tasks=["niah"],
        lengths=[400],
        keeps=[0.5],
        samples=1,
        lm=lm,
        out=tmp_path,
        max_new_tokens=2,
        progress=False,
    )
    rows = {r["spec"]: r for r in res.rows}
    pyramid, snap = rows["pyramidkv"], rows["snapkv"]
    for r in (pyramid, snap):
        assert r["kv_rows"] == 4 * 2
        assert abs(r["kept_total"] - r["target_tokens"] * r["kv_rows"]) <= 0.01 * r["kept_total"]
    assert pyramid["kept_layer_min"] < pyramid["kept_tokens"] < pyramid["kept_layer_max"]
    assert snap["kept_layer_min"] == snap["kept_tokens"] == snap["kept_layer_max"]
    assert all(s["fair"] for s in res.summary)
    text = (tmp_path / "summary.md").read_text()
    assert "kept/layer min-mean-max" in text
    line = next(x for x in text.splitlines() if x.startswith("- `pyramidkv` on niah"))
    assert f"{pyramid['kept_layer_min']:.1f} / " in line
    assert "- `snapkv` on niah" not in text.split("kept/layer min-mean-max")[1].split("\n\n")[1]
