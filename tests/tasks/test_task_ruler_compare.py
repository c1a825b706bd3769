"""``kvlab compare --tasks ruler`` end to end on a tiny model (the CI check of the RULER suite)."""

from __future__ import annotations

import json

import pytest
from matplotlib.image import imread

from kvpress_lab.cli.main import main
from kvpress_lab.compare.defaults import DEFAULTS
from kvpress_lab.compare.report import summarize
from kvpress_lab.tasks import TASK_GROUPS, generate_samples
from kvpress_lab.testing import save_tiny_model

LENGTH = 3000  # characters = tokens of the tiny model's character tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("ruler") / "m", layers=1)


def _compare(model_dir, out, tasks: str) -> list[dict]:
    argv = [
        "compare", "--policies", "random", "--tasks", tasks, "--lengths", str(LENGTH),
        "--keep", "0.5", "--samples", "1", "--model", str(model_dir), "--out", str(out),
        "--max-new-tokens", "2", "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


def test_compare_runs_the_ruler_suite(model_dir, tmp_path, capsys):
    rows = _compare(model_dir, tmp_path / "all", "ruler")
    ruler = TASK_GROUPS["ruler"]
    assert len(rows) == 13 * 2  # one sample of each task, full cache and random
    assert sorted({r["task"] for r in rows}) == sorted(ruler)  # a row names its own task
    assert {r["task_group"] for r in rows} == {"ruler"}
    for spec in ("full", "random"):
        ids = [r["sample_id"] for r in rows if r["spec"] == spec]
        assert sorted(ids) == sorted(f"{t}-{LENGTH}-0-0" for t in ruler)
    for r in rows:
        qa = r["sample_id"].startswith("ruler:qa_")
        assert r["metric"] == ("string_match_part" if qa else "string_match_all")
        assert abs(r["prompt_tokens"] - LENGTH) <= 0.02 * LENGTH + 1  # + BOS
        assert 0.0 <= r["score"] <= 1.0 and r["references"]
        if r["spec"] == "random":
            assert r["kept_tokens"] == r["target_tokens"] == int(0.5 * r["prompt_tokens"])
    out = capsys.readouterr().out
    # the group's line over all 13 samples, and a line per task
    assert f"| `random` | ruler | {LENGTH} | 0.5 | 13 |" in out
    assert f"| `full` | ruler | {LENGTH} | 1 (full) | 13 |" in out
    for task in ruler:
        assert f"| `random` | {task} | {LENGTH} | 0.5 | 1 |" in out
    summary = (tmp_path / "all" / "summary.csv").read_text()
    group = [x for x in summary.splitlines() if x.startswith("random,ruler,")]
    scores = [r["score"] for r in rows if r["spec"] == "random"]
    assert len(group) == 1 and float(group[0].split(",")[6]) == pytest.approx(sum(scores) / 13)
    # each task's own answer length unless --max-new-tokens overrides it (2 here)
    assert {r["max_new_tokens"] for r in rows} == {2}
    # the plots show the group, one panel (6 inches at 200 dpi), the tables every task
    lines = summarize(rows)
    assert {s["task"] for s in lines if s["task_group"] is None} == {"ruler"}
    assert {s["task"] for s in lines if s["task_group"] == "ruler"} == set(ruler)
    assert imread(tmp_path / "all" / "accuracy_vs_keep.png").shape[1] == 6 * 200


def test_compare_picks_single_ruler_tasks(model_dir, tmp_path):
    rows = _compare(model_dir, tmp_path / "two", "ruler:niah_single_2,ruler:qa_1")
    assert sorted((r["task"], r["spec"]) for r in rows) == [
        ("ruler:niah_single_2", "full"),
        ("ruler:niah_single_2", "random"),
        ("ruler:qa_1", "full"),
        ("ruler:qa_1", "random"),
    ]
    assert {r["sample_id"] for r in rows} == {
        f"ruler:niah_single_2-{LENGTH}-0-0",
        f"ruler:qa_1-{LENGTH}-0-0",
    }


def test_compare_takes_each_tasks_answer_length_and_names_the_background(model_dir, tmp_path):
    out = tmp_path / "own"
    argv = [
        "compare", "--policies", "random", "--tasks", "ruler:cwe,ruler:vt,babilong-qa1",
        "--lengths", str(LENGTH), "--keep", "0.5", "--samples", "1", "--model", str(model_dir),
        "--out", str(out), "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    want = {"ruler:cwe": 120, "ruler:vt": 30, "babilong-qa1": DEFAULTS["max_new_tokens"]}
    for r in rows:
        assert r["max_new_tokens"] == want[r["task"]]
        assert 0 < r["decode_tokens"] <= r["max_new_tokens"]
        assert r["task_group"] is None
    # the tiny random model never stops early here: the answer runs to each task's length
    assert {r["task"]: r["decode_tokens"] for r in rows} == want
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["max_new_tokens"] is None
    header = (out / "summary.md").read_text().splitlines()[3]
    assert header.endswith("new tokens (babilong-qa1 24, ruler:cwe 120, ruler:vt 30)")
    # the background text a BABILong-style sample was built on, and the note that explains it
    qa1 = [r for r in rows if r["task"] == "babilong-qa1"]
    sample = generate_samples("babilong-qa1", LENGTH, 1, 0, len)[0]
    assert all(r["background"] == sample.meta["background"] for r in qa1)
    assert all(r.get("note") == sample.meta.get("note") for r in qa1)
