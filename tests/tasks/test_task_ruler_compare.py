"""``kvlab compare --tasks ruler`` end to end on a tiny model (the CI check of the RULER suite)."""

from __future__ import annotations

import json

import pytest

from kvpress_lab.cli.main import main
from kvpress_lab.tasks import TASK_GROUPS
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
    assert {r["task"] for r in rows} == {"ruler"}
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
    assert f"| `random` | ruler | {LENGTH} | 0.5 | 13 |" in out
    assert f"| `full` | ruler | {LENGTH} | 1 (full) | 13 |" in out


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
