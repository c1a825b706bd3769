"""Shared fixtures. tests/ is put on sys.path so tests can `from tiny import tiny_model`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def default_lm():
    """The default SmolLM2-135M-Instruct model, loaded once per test session (~20 s)."""
    from kvpress_lab.models import load_model

    return load_model()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny random llama with a char tokenizer (1024 positions), for CLI tests."""
    from tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), max_position_embeddings=1024)
