"""Nothing lost, nothing silent: kills and torn lines, failing plugins, reused --out, early checks.

Tiny models only: an in-process one for the library API and a saved one for the CLI.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import attrs
import pytest
from compare_helpers import AttentionPolicy, QuestionAttentionScorer, registry_with_test_policy
from tiny import save_tiny_model, tiny_model

from kvpress_lab.cli.main import main
from kvpress_lab.compare import compare
from kvpress_lab.compare.store import append_row, read_rows, repair_tail
from kvpress_lab.errors import InputError, PluginError
from kvpress_lab.policy import Composition
from kvpress_lab.registry import Component, PluginInfo, Registry

REPO = Path(__file__).resolve().parents[2]
LENGTH = 600


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", layers=2)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "m", max_position_embeddings=1024)


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


# ---------------------------------------------------------------- torn lines and kills


def test_append_after_a_torn_line_keeps_both_rows(tmp_path):
    """The reproduced loss: a row appended after a torn fragment used to share its line."""
    path = tmp_path / "results.jsonl"
    append_row(path, {"key": "a", "v": 1})
    with path.open("a", encoding="utf-8") as f:
        f.write('{"key": "b", "v"')  # a kill in the middle of writing row b
    append_row(path, {"key": "c", "v": 3})
    assert _lines(path) == ['{"key": "a", "v": 1}', '{"key": "c", "v": 3}']
    assert [r["key"] for r in read_rows(tmp_path)] == ["a", "c"]


def test_repair_tail_only_cuts_a_fragment(tmp_path):
    path = tmp_path / "results.jsonl"
    assert repair_tail(path) == 0  # missing file
    path.write_text('{"key": "a"}\n')
    assert repair_tail(path) == 0 and path.read_text() == '{"key": "a"}\n'
    path.write_text('{"key": "a"}\n{"ke')
    assert repair_tail(path) == 4 and path.read_text() == '{"key": "a"}\n'
    path.write_text('{"ke')  # the fragment is the only line
    assert repair_tail(path) == 4 and path.read_text() == ""


def _compare_argv(model: Path, out: Path) -> list[str]:
    return [
        "compare", "--policies", "random,streamingllm", "--lengths", str(LENGTH), "--keep", "0.5",
        "--samples", "4", "--model", str(model), "--out", str(out), "--max-new-tokens", "2",
        "--no-progress",
    ]  # fmt: skip


def _rows_written(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_at_random_points_then_resume_equals_an_uninterrupted_run(
    seed, saved_model, tmp_path, capsys
):
    """SIGKILL a CLI compare at a random row, tear the last line at a random byte (a kill in
    mid-write), resume: the rows equal an uninterrupted run's, none lost, none twice."""
    rng = random.Random(seed)
    reference = tmp_path / "reference"
    assert main(_compare_argv(saved_model, reference)) == 0
    want = {json.loads(x)["key"]: json.loads(x) for x in _lines(reference / "results.jsonl")}
    assert len(want) == 4 * 3

    out = tmp_path / "killed"
    results = out / "results.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "kvpress_lab.cli.main", *_compare_argv(saved_model, out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stop_at = rng.randint(1, len(want) - 2)
    deadline = time.monotonic() + 240
    while _rows_written(results) < stop_at and proc.poll() is None:
        assert time.monotonic() < deadline, "the compare never wrote its rows"
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.2))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()
    data = results.read_bytes()
    last = data.rfind(b"\n", 0, len(data) - 1) + 1  # start of the last line
    if rng.random() < 0.8 and len(data) - last > 2:
        results.write_bytes(data[: rng.randint(last + 1, len(data) - 2)])  # torn mid-row

    capsys.readouterr()
    assert main(_compare_argv(saved_model, out)) == 0
    lines = _lines(results)
    got = [json.loads(x) for x in lines]
    keys = [r["key"] for r in got]
    assert len(keys) == len(set(keys)), "a row was stored twice"
    assert set(keys) == set(want), "rows were lost or invented"
    for row in got:
        assert row["prediction"] == want[row["key"]]["prediction"]
        assert row["kept_tokens"] == want[row["key"]]["kept_tokens"]
    # the summary counts every sample, as the uninterrupted run's does
    assert _summary_cells(out) == _summary_cells(reference)
    assert {cell[1] for cell in _summary_cells(out)} == {"4"}


def _summary_cells(out: Path) -> list[tuple]:
    with (out / "summary.csv").open(newline="") as f:
        return [(r["policy"], r["n"], r["accuracy"]) for r in csv.DictReader(f)]


# ---------------------------------------------------------------- failing plugins


class ExplodingScorer(QuestionAttentionScorer):
    """Raises for contexts of one sample only, so the other samples of its policy survive."""

    name: ClassVar[str] = "test_exploding"
    fixed: ClassVar[bool] = False  # a test flips it to play "the plugin got fixed"

    def score(self, layout, observed, candidates, cache_keys):
        if layout.context_length % 2 == 0 and not self.fixed:
            raise ZeroDivisionError("even contexts are not my thing")
        return super().score(layout, observed, candidates, cache_keys)


@attrs.define(kw_only=True)
class ExplodingPolicy(AttentionPolicy):
    name: ClassVar[str] = "test_exploding"

    def compose(self) -> Composition:
        base = super().compose()
        return attrs.evolve(base, scorers={"main": ExplodingScorer()})


def _registry_with_exploding() -> Registry:
    base = registry_with_test_policy()
    info = PluginInfo("test_exploding", __name__, "kvlab-exploding", "9.9")
    components = {kind: dict(table) for kind, table in base.components.items()}
    components["policy"]["test_exploding"] = Component(
        "policy", "test_exploding", ExplodingPolicy, info
    )
    return Registry(components, (*base.plugins, info), base.problems)


def _run(lm, out, registry, **kw):
    args = dict(
        tasks=["niah"], lengths=[LENGTH], keeps=[0.5], samples=4, lm=lm, out=out,
        registry=registry, max_new_tokens=2, progress=False,
    )  # fmt: skip
    args.update(kw)
    return compare(**args)


@pytest.mark.parametrize("share_prefill", [True, False])
def test_a_failing_plugin_fails_only_its_cells(lm, tmp_path, share_prefill, capsys):
    registry = _registry_with_exploding()
    res = _run(
        lm, tmp_path, registry, policies=["test_exploding", "test_attention"],
        share_prefill=share_prefill,
    )  # fmt: skip
    lengths = {r["sample_index"]: r["prompt_tokens"] for r in res.rows if r["spec"] == "full"}
    bad_samples = {i for i, n in lengths.items() if n % 2 == 0}
    assert bad_samples and len(bad_samples) < 4  # the tiny sweep hits both cases
    assert len(res.rows) == 4 * 3  # every cell has a row, failed or not
    failed = {(r["spec"], r["sample_index"]) for r in res.failed}
    assert failed == {("test_exploding", i) for i in bad_samples}
    row = res.failed[0]
    assert row["failed"] is True
    assert row["error"] == (
        "plugin failed: scorer 'test_exploding' (kvlab-exploding 9.9, in policy "
        "'test_exploding') raised ZeroDivisionError: even contexts are not my thing; fix or "
        "update that plugin (or uninstall it), or choose another policy"
    )
    assert row["plugin"]["kind"] == "scorer" and "ZeroDivisionError" in row["traceback"]
    good = [r for r in res.rows if not r.get("failed")]
    assert {r["spec"] for r in good} == {"full", "test_attention", "test_exploding"}
    summary = (tmp_path / "summary.md").read_text()
    table, failures = summary.split("## Failed cells")
    assert f"| `test_exploding` | niah | {LENGTH} | 0.5 | {4 - len(bad_samples)} |" in table
    assert f"| `test_attention` | niah | {LENGTH} | 0.5 | 4 |" in table
    assert (
        f"| `test_exploding` | niah | {LENGTH} | 0.5 | {len(bad_samples)} | plugin failed: "
        "scorer 'test_exploding'" in failures
    )
    # a rerun retries only the failed cells, and replaces their rows when they succeed
    ExplodingScorer.fixed = True
    try:
        again = _run(
            lm, tmp_path, registry, policies=["test_exploding", "test_attention"],
            share_prefill=share_prefill,
        )  # fmt: skip
    finally:
        ExplodingScorer.fixed = False
    assert again.ran == len(bad_samples) and again.failed == []
    assert len(again.rows) == 12 and len(_lines(tmp_path / "results.jsonl")) == 12
    assert "## Failed cells" not in (tmp_path / "summary.md").read_text()


def test_cli_compare_with_a_failing_cell_exits_3_after_writing_everything(
    saved_model, tmp_path, capsys, monkeypatch
):
    import kvpress_lab.compare.runner as runner

    monkeypatch.setattr(runner, "default_registry", _registry_with_exploding)
    out = tmp_path / "o"
    argv = [
        "compare", "--policies", "test_exploding,random", "--lengths", str(LENGTH), "--keep",
        "0.5", "--samples", "4", "--model", str(saved_model), "--out", str(out),
        "--max-new-tokens", "2", "--no-progress",
    ]  # fmt: skip
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 3
    err = captured.err.strip().splitlines()[-1]
    assert err.startswith("kvlab: error: ") and "row(s) failed, first: plugin failed: scorer" in err
    assert "Traceback" not in captured.err
    assert "## Failed cells" in captured.out  # the summary was printed, marks included
    rows = [json.loads(x) for x in _lines(out / "results.jsonl")]
    assert len(rows) == 12
    assert {r["spec"] for r in rows if not r.get("failed")} >= {"full", "random"}
    assert sum(1 for r in rows if r["spec"] == "random" and not r.get("failed")) == 4


def test_compose_that_raises_is_a_one_line_plugin_error(lm, tmp_path):
    class Broken(AttentionPolicy):
        name: ClassVar[str] = "test_broken_compose"

        def compose(self):
            raise KeyError("no such scorer")

    with pytest.raises(PluginError, match=r"^plugin failed: policy 'test_broken_compose' \("):
        _run(lm, tmp_path / "o", registry_with_test_policy(), policies=[Broken()])
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- one sweep per directory


def test_other_sweep_into_same_out_is_refused_or_extended(lm, tmp_path):
    registry = registry_with_test_policy()
    first = _run(lm, tmp_path, registry, policies=["test_attention"], samples=2)
    assert len(first.rows) == 2 * 2
    for change, text in (
        ({"policies": ["random"]}, "--policies test_attention there, random now"),
        ({"policies": ["test_attention"], "keeps": [0.25]}, "--keep 0.5 there, 0.25 now"),
        ({"policies": ["test_attention"], "samples": 3}, "--samples 2 there, 3 now"),
        ({"policies": ["test_attention"], "lengths": [700]}, f"--lengths {LENGTH} there, 700 now"),
    ):
        kw = {"samples": 2, **change}
        with pytest.raises(InputError) as info:
            _run(lm, tmp_path, registry, **kw)
        message = str(info.value)
        assert text in message and "add --extend" in message and "another --out" in message
    assert len(_lines(tmp_path / "results.jsonl")) == 4  # nothing was added
    # the same sweep resumes (nothing to do); full in --policies is the same sweep
    assert _run(lm, tmp_path, registry, policies=["full", "test_attention"], samples=2).ran == 0

    extended = _run(lm, tmp_path, registry, policies=["random"], samples=2, extend=True)
    assert extended.ran == 2 and len(extended.rows) == 6
    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert meta["policies"] == ["test_attention", "random"]
    assert [inv["policies"] for inv in meta["invocations"]] == [
        ["test_attention"], ["full", "test_attention"], ["random"],
    ]  # fmt: skip
    assert [inv["extend"] for inv in meta["invocations"]] == [False, False, True]
    assert {(p["spec"], p["keep_ratio"]) for p in meta["resolved_policies"]} == {
        ("full", None), ("test_attention", 0.5), ("random", 0.5),
    }  # fmt: skip
    summary = (tmp_path / "summary.md").read_text()
    assert f"| `random` | niah | {LENGTH} | 0.5 | 2 |" in summary
    assert f"| `test_attention` | niah | {LENGTH} | 0.5 | 2 |" in summary
    # the union is now the directory's sweep: rerunning both together resumes
    assert _run(lm, tmp_path, registry, policies=["random", "test_attention"], samples=2).ran == 0


# ---------------------------------------------------------------- checks before the weights


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if any model weights load: the checks under test must come first."""
    import kvpress_lab.models as models

    def refuse(*args, **kwargs):
        raise AssertionError("weights loaded before the inputs were checked")

    monkeypatch.setattr(models, "load_model", refuse)


def _cli(capsys, argv) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def _assert_one_line(err: str) -> str:
    assert err.startswith("kvlab: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def test_compare_lengths_beyond_the_model_fail_before_weights_naming_lengths(
    saved_model, tmp_path, capsys, no_weights
):
    out = tmp_path / "o"
    code, err = _cli(
        capsys,
        ["compare", "--policies", "random", "--lengths", "600,2k", "--model", str(saved_model),
         "--out", str(out), "--no-progress", "--max-new-tokens", "2"],
    )  # fmt: skip
    assert code == 2
    _assert_one_line(err)
    assert "exceeds" in err and "maximum of 1024 positions" in err
    assert "lower --lengths (under 1022 context tokens" in err and "shorten the context" not in err
    assert not out.exists()


def test_compare_lengths_that_overflow_with_the_question_name_the_worst_prompt_and_a_fit(
    saved_model, tmp_path, capsys, no_weights
):
    # 1000 context tokens fit the tiny model's 1024 positions alone, not with question + answer
    argv = ["compare", "--policies", "random", "--model", str(saved_model), "--samples", "2",
            "--out", str(tmp_path / "o"), "--no-progress", "--max-new-tokens", "8"]  # fmt: skip
    code, err = _cli(capsys, [*argv, "--lengths", "500,1000"])
    assert code == 2
    _assert_one_line(err)
    told = re.search(
        r"at --lengths 1000 the longest prompt \((\S+) sample \d: context (\d+) \+ question "
        r"(\d+) \+ answer 8 = (\d+) tokens\) is (\d+) over \S+'s maximum of 1024 positions; "
        r"lower --lengths 1000 to at most (\d+) \(",
        err,
    )
    assert told, err
    context, question, total, over, fits = (int(g) for g in told.groups()[1:])
    assert context + question + 8 == total and total - 1024 == over > 0
    assert "--lengths 500" not in err  # 500 fits: only the overflowing length is named
    assert not (tmp_path / "o").exists()
    # the suggested length passes every check: the run gets as far as loading the weights
    with pytest.raises(AssertionError, match="weights loaded before the inputs were checked"):
        main([*argv, "--lengths", f"500,{fits}"])
    # and one more token per question overflows again (the suggestion is not needlessly low)
    code, err = _cli(capsys, [*argv, "--lengths", f"{fits + 60}"])
    assert code == 2 and f"at --lengths {fits + 60} the longest prompt" in err, err


def test_compare_jsonl_errors_fail_before_the_model_and_leave_no_directory(
    tmp_path, capsys, no_weights
):
    data = tmp_path / "mine.jsonl"
    good = {"context": "Some text.", "question": "Q?", "answers": ["a"]}
    data.write_text(json.dumps(good) + "\n" + json.dumps({**good, "context": "  "}) + "\n")
    out = tmp_path / "o"
    code, err = _cli(
        capsys,
        ["compare", "--policies", "random", "--tasks", str(data), "--samples", "1",
         "--model", str(tmp_path / "no-such-model"), "--out", str(out), "--no-progress"],
    )  # fmt: skip
    assert code == 2
    _assert_one_line(err)
    assert "mine.jsonl line 2: field 'context' is empty" in err  # past --samples 1, too
    assert not out.exists()


def test_compare_jsonl_context_too_long_names_file_and_line(
    saved_model, tmp_path, capsys, no_weights
):
    data = tmp_path / "long.jsonl"
    row = {"context": "x" * 1500, "question": "Q?", "answers": ["a"]}
    data.write_text(json.dumps(row) + "\n")
    out = tmp_path / "o"
    code, err = _cli(
        capsys,
        ["compare", "--policies", "random", "--tasks", str(data), "--lengths", "4k",
         "--samples", "1", "--model", str(saved_model), "--out", str(out), "--no-progress"],
    )  # fmt: skip
    assert code == 2
    _assert_one_line(err)
    # --lengths (beyond the model, but a JSONL file ignores it) is not what gets blamed
    assert f"shorten the context of {data} line 1 to at most" in err and "--lengths" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("file", "--out {out} exists and is not a directory"),
        ("parent-file", "--out {out}: {parent} is a file, so the directory cannot be created"),
    ],
)
def test_compare_bad_out_fails_before_the_model(tmp_path, capsys, no_weights, setup, message):
    if setup == "file":
        out = tmp_path / "taken"
        out.write_text("x")
        parent = None
    else:
        parent = tmp_path / "afile"
        parent.write_text("x")
        out = parent / "sub"
    code, err = _cli(
        capsys,
        ["compare", "--policies", "random", "--model", str(tmp_path / "no-model"), "--out",
         str(out), "--no-progress"],
    )  # fmt: skip
    assert code == 2
    _assert_one_line(err)
    assert message.format(out=out, parent=parent) in err


def test_html_sample_out_of_range_is_refused_first(tmp_path, capsys, no_weights):
    code, err = _cli(
        capsys,
        ["compare", "--policies", "random", "--samples", "2", "--html-sample", "5",
         "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o"), "--no-progress"],
    )  # fmt: skip
    assert code == 2 and "--html-sample 5 is not a sample of this sweep; give 0..1" in err
    assert not (tmp_path / "o").exists()
