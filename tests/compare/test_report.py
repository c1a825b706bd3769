"""Summaries and plots of constructed comparison rows: intervals, paired verdicts, fairness."""

from __future__ import annotations

import csv
import struct

import matplotlib.colors
import matplotlib.image
import numpy as np
import pytest

from kvpress_lab.compare.report import (
    PLOT_DPI,
    PLOTS,
    policy_colors,
    summarize,
    write_plots,
    write_summary,
)

N = 30


def _row(spec, keep, index, score, *, length=1000, task="niah", kept=None, target=None):
    L = length + 10
    target = (L if keep is None else int(keep * L)) if target is None else target
    return {
        "spec": spec, "task": task, "target_length": length, "keep_ratio": keep,
        "sample_id": f"{task}-{length}-0-{index}", "score": float(score),
        "kept_tokens": target if kept is None else kept, "target_tokens": target,
        "kv_bytes_kept": 100 * (target if kept is None else kept), "kv_bytes_full": 100 * L,
        "peak_kv_bytes": 100 * L, "prefill_s": 1.0, "compress_s": 0.1, "decode_s": 0.5,
        "decode_tokens_per_s": 20.0, "shared_prefill": True,
    }  # fmt: skip


def _rows(overshoot: float = 0.0) -> list[dict]:
    """30 samples: full right on all; `ref` on 15; `good` on all 30 (better than ref), `bad`
    on 2 of ref's 15 (worse), `same` on 15 others that differ from ref's on 3+3 samples."""
    rows = []
    ref_right = set(range(15))
    same_right = (ref_right - {0, 1, 2}) | {15, 16, 17}
    for i in range(N):
        rows.append(_row("full", None, i, 1))
        rows.append(_row("ref", 0.25, i, i in ref_right))
        rows.append(_row("good", 0.25, i, 1))
        rows.append(_row("bad", 0.25, i, i in {0, 1}))
        target = int(0.25 * 1010)
        kept = int(round(target * (1 + overshoot)))
        rows.append(_row("same", 0.25, i, i in same_right, kept=kept))
    return rows


def _by_policy(summary):
    return {s["policy"]: s for s in summary}


def test_cells_carry_intervals_and_paired_verdicts():
    s = _by_policy(summarize(_rows(), reference="ref"))
    # ref: 15/30 -> Wilson by hand: centre (15 + 1.92073) / 33.84146 = 0.5, half-width
    # 1.96 * sqrt(7.5 + 0.960366) / 33.84146 = 0.16846 -> [0.3315, 0.6685]
    assert s["ref"]["accuracy"] == 0.5 and s["ref"]["interval"] == "wilson"
    assert (s["ref"]["accuracy_low"], s["ref"]["accuracy_high"]) == pytest.approx(
        (0.3315, 0.6685), abs=1e-4
    )
    assert s["good"]["vs_reference_verdict"] == "better"
    assert s["good"]["vs_reference"] == pytest.approx(0.5)
    assert s["bad"]["vs_reference_verdict"] == "worse"
    assert s["bad"]["vs_reference"] == pytest.approx((2 - 15) / 30)
    assert s["same"]["vs_reference_verdict"] == "no detectable difference at n=30"
    assert s["same"]["vs_reference"] == pytest.approx(0.0)
    # against the full cache (right on all 30): ref loses 15 -> worse; good ties everywhere
    assert s["ref"]["vs_full_verdict"] == "worse"
    assert s["good"]["vs_full_verdict"] == "no detectable difference at n=30"
    assert s["ref"]["vs_reference_verdict"] == "" and s["full"]["vs_full_verdict"] == ""
    assert all(line["fair"] for line in s.values())


def test_pairs_only_the_samples_both_ran_on():
    rows = [r for r in _rows() if not (r["spec"] == "good" and r["sample_id"].endswith("-29"))]
    s = _by_policy(summarize(rows, reference="ref"))
    assert s["good"]["n"] == 29 and s["good"]["vs_reference_n"] == 29
    # 14 of ref's right samples are among the 29 -> difference (29 - 15) / 29
    assert s["good"]["vs_reference"] == pytest.approx(14 / 29)


def test_a_five_percent_overshoot_is_unfair_and_not_ranked(tmp_path):
    rows = _rows(overshoot=0.05)  # `same` keeps 265 tokens against a target of 252
    summary = write_summary(tmp_path, rows, {"model": "m", "resolved_policies": [
        {"spec": "full"}, {"spec": "ref"}, {"spec": "good"}]})  # fmt: skip
    s = _by_policy(summary)
    assert s["same"]["fair"] is False
    assert s["same"]["kept_tokens"] == 265 and s["same"]["target_tokens"] == 252
    assert s["same"]["vs_reference_verdict"] == "not comparable: unfair budget"
    assert s["same"]["vs_full_verdict"] == "not comparable: unfair budget"
    assert s["good"]["fair"] is True
    md = (tmp_path / "summary.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("| `same` |"))
    assert line.endswith("| 265.0 | 252.0 | **no** |")
    assert "not comparable: unfair budget" in line
    assert (
        "`same` on niah at 1000 tokens, keep 0.25: kept 265.0 tokens against a target of 252.0"
        in md
    )
    with (tmp_path / "summary.csv").open() as f:
        fair = {r["policy"]: r["fair"] for r in csv.DictReader(f)}
    assert fair["same"] == "False" and fair["good"] == "True"


def test_markdown_table_shows_intervals_and_the_reference_named(tmp_path):
    meta = {"model": "m", "resolved_policies": [{"spec": "full"}, {"spec": "ref"}]}
    write_summary(tmp_path, _rows(), meta)
    md = (tmp_path / "summary.md").read_text()
    assert "| vs ref [95%] | verdict vs ref |" in md
    good = next(x for x in md.splitlines() if x.startswith("| `good` |"))
    assert "| 1.00 [0.89, 1.00] |" in good  # Wilson 30/30: 1 - 3.8415 / 33.8415 = 0.8865
    assert "| better |" in good
    assert "Tighter intervals:" in md and "--samples 120" in md
    failed_rows = [*_rows(), {**_row("ref", 0.25, 99, 0), "failed": True}]
    assert _by_policy(summarize(failed_rows, reference="ref"))["ref"]["n"] == N


def _pixels(path, color: str) -> int:
    img = (matplotlib.image.imread(path)[..., :3] * 255).round().astype(int)
    rgb = np.array([int(round(c * 255)) for c in matplotlib.colors.to_rgb(color)])
    return int((np.abs(img - rgb).sum(axis=-1) == 0).sum())


def _png_size(path) -> tuple[int, int]:
    return struct.unpack(">II", path.read_bytes()[16:24])


def _plot_rows(others_score: float) -> list[dict]:
    rows = []
    for length in (1000, 2000):
        for i in range(5):
            rows.append(_row("full", None, i, 1, length=length))
            for keep in (0.5, 0.25):
                rows += [_row(p, keep, i, others_score, length=length) for p in ("a", "b", "c")]
    return rows


def test_plots_one_colour_per_policy_full_visible_at_double_resolution(tmp_path):
    summary = summarize(_plot_rows(1.0))  # every policy as right as the full cache
    colors = policy_colors(summary)
    assert list(colors) == ["full", "a", "b", "c"]
    assert len(set(colors.values())) == 4
    (tmp_path / "tie").mkdir()
    paths = write_plots(tmp_path / "tie", summary)
    assert [p.name for p in paths] == list(PLOTS)
    for path in paths:
        width, height = _png_size(path)
        # at least twice the pixels of the former plots (one task: 5.5 x 4 in at 100 dpi)
        assert PLOT_DPI == 200 and width >= 1100 and height >= 800
        for policy, color in colors.items():
            assert _pixels(path, color) > 30, (path.name, policy)  # same colour in every plot
    # full is not hidden where the others reach 1.0 with it: as much of it shows as when the
    # others sit at 0, far away
    (tmp_path / "apart").mkdir()
    apart = write_plots(tmp_path / "apart", summarize(_plot_rows(0.0)))
    for tie, alone in zip(paths, apart, strict=True):
        assert _pixels(tie, colors["full"]) >= 0.9 * _pixels(alone, colors["full"]), tie.name
