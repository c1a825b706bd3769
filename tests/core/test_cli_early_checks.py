"""`kvlab run` checks every input and output before the weights load, with messages that name
the actual problem and its fix (exit status 2, one line, no traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvpress_lab.cli.main import main


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if any weights load: the checks under test must come first."""
    import kvpress_lab.models as models

    def refuse(*args, **kwargs):
        raise AssertionError("weights loaded before the inputs were checked")

    monkeypatch.setattr(models, "load_model", refuse)


@pytest.fixture
def ctx_file(tmp_path):
    path = tmp_path / "context.txt"
    path.write_text("The grass is green. The sky is blue. " * 4)
    return path


def _run(capsys, *args: str) -> tuple[int, str]:
    code = main(["run", *args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("kvlab: error: ") and err.count("\n") == 1, err
    return code, err


def test_html_pointing_at_a_directory_fails_before_any_work(
    capsys, tiny_model_dir, ctx_file, tmp_path, no_weights
):
    code, err = _run(
        capsys, "--model", str(tiny_model_dir), "--context-file", str(ctx_file), "--question",
        "Why?", "--html", str(tmp_path),
    )  # fmt: skip
    assert code == 2
    assert f"--html {tmp_path} is a directory; give a file path, e.g. --html {tmp_path}" in err


def test_html_in_a_missing_directory_fails_before_any_work(
    capsys, tiny_model_dir, ctx_file, tmp_path, no_weights
):
    target = tmp_path / "nope" / "view.html"
    code, err = _run(
        capsys, "--model", str(tiny_model_dir), "--context-file", str(ctx_file), "--question",
        "Why?", "--html", str(target),
    )  # fmt: skip
    assert code == 2
    assert f"directory {tmp_path / 'nope'} does not exist; create it first" in err


def test_too_long_question_is_told_to_shorten_the_question(
    capsys, tiny_model_dir, ctx_file, no_weights
):
    question = "Is this the question? " * 60  # 1320 char tokens > the tiny model's 1024
    code, err = _run(
        capsys, "--model", str(tiny_model_dir), "--context-file", str(ctx_file), "--question",
        question,
    )  # fmt: skip
    assert code == 2
    assert "alone need 1355 of" in err and "'s 1024 positions, leaving none for the context" in err
    assert "shorten the question" in err and "shorten the context" not in err


def test_too_long_context_names_the_file_and_the_room_before_weights(
    capsys, tiny_model_dir, tmp_path, no_weights
):
    path = tmp_path / "long.txt"
    path.write_text("x" * 1100)
    code, err = _run(
        capsys, "--model", str(tiny_model_dir), "--context-file", str(path), "--question", "q",
        "--max-new-tokens", "4",
    )  # fmt: skip
    assert code == 2
    assert "exceeds" in err and "maximum of 1024 positions" in err
    assert f"shorten the context in {path} to at most " in err


def test_directory_with_only_a_gguf_file_names_the_file(capsys, ctx_file, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.Q4.gguf").write_bytes(b"GGUF")
    code, err = _run(
        capsys, "--model", str(folder), "--context-file", str(ctx_file), "--question", "q",
    )  # fmt: skip
    assert code == 2
    assert f"has no config.json but holds model.Q4.gguf; pass the file: --model {folder}" in err


def _kvlab_env(tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_HOME")}
    # an empty cache and an endpoint that refuses connections: no network
    env.update(
        HF_HUB_CACHE=str(tmp_path / "hub"),
        HF_ENDPOINT="http://127.0.0.1:9",
        OMP_NUM_THREADS="1",
        **extra,
    )
    return env


@pytest.mark.parametrize("offline", [False, True])
def test_uncached_hub_id_without_network_fails_in_seconds(tmp_path, ctx_file, offline):
    env = _kvlab_env(tmp_path, **({"HF_HUB_OFFLINE": "1"} if offline else {}))
    kvlab = Path(sys.executable).parent / "kvlab"
    start = time.monotonic()
    proc = subprocess.run(
        [str(kvlab), "run", "--model", "someorg/not-cached-model", "--context-file",
         str(ctx_file), "--question", "q"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert "model 'someorg/not-cached-model' is not in the local Hugging Face cache" in err
    if offline:
        assert "HF_HUB_OFFLINE is set; download it first" in err
    else:
        assert "127.0.0.1 cannot be reached" in err and "connect to the network" in err
    # it used to retry for ~50 s; generous for a loaded machine, far below the old behaviour
    assert elapsed < 40, elapsed
