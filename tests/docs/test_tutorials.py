"""Every code block of every tutorial runs, in order, in a fresh process (see tutorial_runner.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).with_name("tutorial_runner.py")
PAGES = sorted((REPO / "docs" / "tutorials").glob("*.md"))

sys.path.insert(0, str(RUNNER.parent))
from tutorial_runner import blocks, commands  # noqa: E402


def test_both_tutorials_exist():
    assert [p.name for p in PAGES] == ["compare-your-data.md", "write-a-plugin.md"]


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_tutorial_runs(page, tmp_path):
    found = list(blocks(page.read_text()))
    assert not [b for b in found if b[3]], f"{page.name} skips blocks; every block must run"
    proc = subprocess.run(
        [sys.executable, str(RUNNER), str(page), str(tmp_path / "work")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    executed = [b for b in found if b[0] in ("python", "bash") or b[1]]
    assert f"TUTORIAL OK: {len(executed)} blocks" in proc.stdout, out[-3000:]


def test_runner_parses_blocks_and_commands():
    page = (
        "text\n```python\nx = 1\n```\n<!-- tutorial: skip -->\n```bash\nkvlab plugins\n```\n"
        '```toml title="pyproject.toml"\n[project]\n```\n'
    )
    got = [(lang, title, body, skip) for lang, title, body, skip, _ in blocks(page)]
    assert got == [
        ("python", None, "x = 1\n", False),
        ("bash", None, "kvlab plugins\n", True),
        ("toml", "pyproject.toml", "[project]\n", False),
    ]
    assert commands("# c\nkvlab run --a 1 \\\n   --b 2\n\npip install x\n") == [
        "kvlab run --a 1     --b 2",
        "pip install x",
    ]


def test_runner_reports_the_failing_block(tmp_path):
    page = tmp_path / "bad.md"
    page.write_text("```python\nok = 1\n```\n\n```python\nassert ok == 2, 'ok is 1'\n```\n")
    proc = subprocess.run(
        [sys.executable, str(RUNNER), str(page), str(tmp_path / "w")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert (
        "TUTORIAL BLOCK FAILED at bad.md:5 (python block): AssertionError: ok is 1" in proc.stderr
    )
