"""Tiny random models for tests: re-exported from the public testing kit."""

from kvpress_lab.testing.tiny import (  # noqa: F401
    ARCHS,
    TinyTokenizer,
    char_tokenizer,
    save_tiny_model,
    tiny_config,
    tiny_model,
)
