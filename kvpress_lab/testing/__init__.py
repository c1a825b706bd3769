"""Helpers for testing policies and plugins: tiny in-process models and the conformance suite.

* :func:`tiny_model` builds a small random transformers model with a character-level tokenizer,
  in-process and without downloads; tutorials and plugin tests use it where the default model
  would be slow.
* :func:`save_tiny_model` writes such a model and a real ``transformers`` tokenizer to a
  directory, so the ``kvlab`` command can load it with ``--model DIR``.
* :mod:`kvpress_lab.testing.conformance` checks that a policy plugin honours the plugin contract.
"""

from kvpress_lab.testing.tiny import (
    ARCHS,
    TinyTokenizer,
    char_tokenizer,
    save_tiny_model,
    tiny_config,
    tiny_model,
)

__all__ = [
    "ARCHS",
    "TinyTokenizer",
    "char_tokenizer",
    "save_tiny_model",
    "tiny_config",
    "tiny_model",
]
