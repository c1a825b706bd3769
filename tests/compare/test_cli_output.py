"""What `kvlab compare` prints: unwrapped tables when redirected, and how to tighten intervals."""

from __future__ import annotations

import argparse
import json

import pytest
from tiny import save_tiny_model

from kvpress_lab.cli.compare import add_parser
from kvpress_lab.cli.main import main
from kvpress_lab.compare.defaults import DEFAULTS
from kvpress_lab.compare.parse import parse_keeps, parse_lengths


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "m")


def _argv(model, out, samples: int, *extra: str) -> list[str]:
    return [
        "compare", "--policies", "random", "--lengths", "600", "--keep", "0.5",
        "--samples", str(samples), "--model", str(model), "--out", str(out),
        "--max-new-tokens", "2", "--no-progress", *extra,
    ]  # fmt: skip


def test_redirected_output_keeps_table_rows_whole_and_ends_with_the_hint(
    tmp_path, capsys, saved_model
):
    out = tmp_path / "o"
    assert main(_argv(saved_model, out, 2)) == 0
    printed = capsys.readouterr().out  # captured: not a terminal, as with `> file`
    md = (out / "summary.md").read_text()
    table_rows = [x for x in md.splitlines() if x.startswith("| `")]
    assert len([x for x in table_rows if len(x) > 80]) >= 2  # wider than a default console
    for row in table_rows:
        assert row in printed.splitlines()  # printed whole, on one line
    last = printed.strip().splitlines()[-1]
    assert last.startswith("Tighter intervals: the widest 95% interval here is +/-")
    assert printed.count("Tighter intervals:") == 1  # summary.md holds it too: printed once
    assert f"--samples 8 and --out {out} --extend" in last

    # the hint's command works: 2 more samples per cell run, the first 2 are reused
    assert main(_argv(saved_model, out, 8, "--extend")) == 0
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 8 * 2  # full + random, 8 samples
    assert "12 row(s) run, 16 in" in capsys.readouterr().out


def test_defaults_run_laserkv_past_its_block_size_on_enough_samples():
    # LASER-KV's block size is 4096: one length must need two blocks, and every cell must hold
    # enough samples for a paired sign test to call a difference (6 of 6 gives p = 0.031)
    assert max(DEFAULTS["lengths"]) > 4096
    assert DEFAULTS["samples"] >= 10
    # the CLI's --lengths default reads back as those lengths (4608 is written 4.5k)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["compare", "--policies", "laserkv,snapkv"])
    assert parse_lengths(args.lengths) == list(DEFAULTS["lengths"])
    assert parse_keeps(args.keep) == list(DEFAULTS["keeps"])
    assert args.samples == DEFAULTS["samples"]


def test_help_names_the_ruler_suite_and_per_task_answer_lengths(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "`ruler` (all 13 RULER tasks, summarized per task and as a group)" in text
    assert "`ruler:<task>` (e.g. ruler:niah_single_1, ruler:cwe, ruler:qa_1)" in text
    assert "RULER's tokens_to_generate such as 120 for ruler:cwe" in text
