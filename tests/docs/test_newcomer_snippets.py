"""What a newcomer copies runs as written: the README's commands and snippet, the docs home page,
the quickstart. CI runs the README's set-up commands verbatim (scripts/test.sh); these tests tie
that script to the README and run every other snippet."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).with_name("snippet_runner.py")
PAGES = [REPO / "README.md", REPO / "docs" / "index.md", REPO / "docs" / "quickstart.md"]

sys.path.insert(0, str(REPO / "scripts"))
from readme_commands import readme_command  # noqa: E402


def test_ci_runs_the_readme_commands_verbatim():
    main = readme_command("main")
    steps = [s.strip() for s in main.split("&&")]
    assert steps[0] == "python3 -m venv .venv"
    # torch pinned before the project, or pip pulls a CUDA build onto a CPU machine
    assert steps.index("pip install torch==2.13.0") < steps.index("pip install -e .")
    assert steps[-1] == "kvlab compare --policies laserkv,snapkv"
    assert readme_command("test") == "bash scripts/test.sh"
    assert "exec bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()
    script = (REPO / "scripts" / "test.sh").read_text()
    assert "main_cmd=$(python3 scripts/readme_commands.py main)" in script
    assert 'bash -c "$main_cmd"' in script


def test_readme_command_extraction_fails_loudly_on_a_split_command():
    text = "**Install and run the main job**\n\n```bash\npip install a\npip install b\n```\n"
    with pytest.raises(ValueError, match="one line"):
        readme_command("main", text)


def _run(page: Path, workdir: Path, tiny: Path | str) -> str:
    argv = [sys.executable, str(RUNNER), str(page), str(workdir), str(tiny)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return proc.stdout


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random llama with the default model's tokenizer: every length and task fits it
    exactly as it fits the default model, in a fraction of the time."""
    from transformers import AutoTokenizer

    from kvpress_lab.models import default_model_path
    from kvpress_lab.testing import save_tiny_model

    gguf = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return save_tiny_model(
        tmp_path_factory.mktemp("tiny"), tokenizer=tokenizer, max_position_embeddings=8192
    )


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_page_snippets_run_as_written(page, tiny_dir, tmp_path):
    out = _run(page, tmp_path / "work", tiny_dir)
    assert "SNIPPETS OK" in out


@pytest.mark.slow
def test_readme_python_snippet_on_the_default_model(tmp_path):
    """The Python snippet alone, as written, on the default model (its CLI commands run above on
    the tiny model; the main command runs verbatim in CI)."""
    out = _run(REPO / "README.md", tmp_path / "work", "--python-only")
    assert "SNIPPETS OK: 1 blocks" in out
