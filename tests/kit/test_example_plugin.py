"""The example third-party plugin installs as its own distribution and works everywhere.

Its own test suite (the conformance checks) runs in tests/docs/test_tutorials.py, which executes
the plugin tutorial's `python -m pytest plugins/kvlab-example-plugin/tests` block.
"""

from __future__ import annotations

import json
import sys

import pytest
from kit_helpers import REPO, pip_install_target, run_with_path

EXAMPLE = REPO / "plugins" / "kvlab-example-plugin"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    pip_install_target(EXAMPLE, target)
    assert (target / "kvlab_keynorm" / "plugin.py").is_file()
    return target


def test_kvlab_plugins_lists_keynorm(site, tmp_path):
    proc = run_with_path(
        [sys.executable, "-m", "kvpress_lab.cli.main", "plugins", "--json"], site, tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    rows = {r["name"]: r for r in data["policy"]}
    assert rows["keynorm"]["distribution"] == "kvlab-example-plugin"
    assert rows["keynorm"]["version"] == "0.1.0"
    assert [p["name"] for p in rows["keynorm"]["parameters"]] == [
        "keep_ratio",
        "budget",
        "decode_interval",
        "decode_budget",
        "sinks",
        "window",
        "granularity",
        "block_size",
    ]
    assert "keynorm" in {r["name"] for r in data["scorer"]}
    assert data["problems"] == []


def test_compare_runs_keynorm_against_snapkv(site, tmp_path):
    from kvpress_lab.testing import save_tiny_model

    model = save_tiny_model(tmp_path / "tiny-model")
    data = tmp_path / "data.jsonl"
    rows = [
        {
            "context": f"Mara keeps bees. The pass key is {k}. Tom fixed the bike. " * 3,
            "question": "What is the pass key?",
            "answers": [str(k)],
            "answer_prefix": "The pass key is",
        }
        for k in (4721, 1903)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    proc = run_with_path(
        [
            sys.executable,
            "-m",
            "kvpress_lab.cli.main",
            "compare",
            "--model",
            str(model),
            "--tasks",
            str(data),
            "--policies",
            "keynorm,snapkv",
            "--keep",
            "0.5",
            "--lengths",
            "1k",
            "--max-new-tokens",
            "4",
            "--out",
            str(out),
            "--no-progress",
        ],
        site,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    names = sorted({r["policy"] for r in results})
    assert names == ["full", "keynorm", "snapkv"]
    for r in results:
        if r["policy"] != "full":
            assert r["kept_tokens"] == r["target_tokens"] == r["prompt_tokens"] // 2
    assert "`keynorm`" in (out / "summary.md").read_text()
