"""The documentation site builds with ``mkdocs build --strict`` (broken links, missing API objects
and nav problems are errors), and the generated pages contain what they promise."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return out


def test_pages_built(site):
    for page in (
        "index.html",
        "quickstart/index.html",
        "concepts/index.html",
        "laserkv/index.html",
        "baselines/snapkv/index.html",
        "baselines/h2o/index.html",
        "baselines/streamingllm/index.html",
        "baselines/finch/index.html",
        "baselines/knorm/index.html",
        "baselines/tova/index.html",
        "baselines/keydiff/index.html",
        "baselines/expected_attention/index.html",
        "tutorials/write-a-plugin/index.html",
        "tutorials/compare-your-data/index.html",
        "benchmarks/index.html",
        "cli/index.html",
        "api/index.html",
        "api/interfaces/index.html",
        "api/policy/index.html",
        "api/registry/index.html",
        "api/engine/index.html",
        "api/testing/index.html",
        "api/views/index.html",
    ):
        assert (site / page).is_file(), page
    assert (site / "img" / "laserkv-budget-and-loop.svg").is_file()


def test_cli_reference_generated_from_parser(site):
    from kvpress_lab.cli.main import build_parser

    html = (site / "cli" / "index.html").read_text()
    sub = next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices)
    for name, parser in sub.choices.items():
        assert f'id="kvlab-{name}"' in html, name
        for action in parser._actions:
            for flag in action.option_strings:
                assert flag in html, f"kvlab {name} {flag} missing from the CLI reference"
    assert "<!-- kvlab-cli -->" not in html


def test_api_reference_renders_docstrings(site):
    html = (site / "api" / "interfaces" / "index.html").read_text()
    for name in ("Scorer", "Selector", "Budgeter", "StepLayout", "Allocation", "LayerObservation"):
        assert re.search(rf'id="kvpress_lab\.interfaces\.{name}"', html), name
    testing = (site / "api" / "testing" / "index.html").read_text()
    assert 'id="kvpress_lab.testing.conformance.check_policy"' in testing


def test_no_compression_ratio_wording():
    for page in (REPO / "docs").rglob("*.md"):
        text = page.read_text().lower()
        for m in re.finditer(r"compression ratio|compression_ratio", text):
            window = text[max(0, m.start() - 200) : m.end() + 200]
            assert "never" in window or "kvpress" in window, f"{page}: {window!r}"
