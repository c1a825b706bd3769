"""kvpress-lab: KV-cache compression policies for Hugging Face transformers.

Quick use::

    from kvpress_lab import load_model, run
    lm = load_model()                       # SmolLM2-135M-Instruct, or any HF causal LM
    result = run(lm, "snapkv:keep_ratio=0.25", context, question, answer_prefix="Answer:")
    print(result.answer, result.kept_tokens, result.kv_bytes_kept)

The names below load on first use (PEP 562), so importing the package, and ``kvlab --help``,
does not import torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "RunResult": "kvpress_lab.engine",
    "prefill_and_compress": "kvpress_lab.engine",
    "run": "kvpress_lab.engine",
    "run_segments": "kvpress_lab.engine",
    "ConfigError": "kvpress_lab.errors",
    "InputError": "kvpress_lab.errors",
    "KvlabError": "kvpress_lab.errors",
    "Allocation": "kvpress_lab.interfaces",
    "Budgeter": "kvpress_lab.interfaces",
    "LayerObservation": "kvpress_lab.interfaces",
    "Scorer": "kvpress_lab.interfaces",
    "Selector": "kvpress_lab.interfaces",
    "StepLayout": "kvpress_lab.interfaces",
    "LoadedModel": "kvpress_lab.models",
    "load_model": "kvpress_lab.models",
    "wrap_model": "kvpress_lab.models",
    "Composition": "kvpress_lab.policy",
    "EngineOptions": "kvpress_lab.policy",
    "Policy": "kvpress_lab.policy",
    "build_prompt": "kvpress_lab.prompt",
    "load_policy": "kvpress_lab.spec",
}

__all__ = [
    "Allocation",
    "Budgeter",
    "Composition",
    "ConfigError",
    "EngineOptions",
    "InputError",
    "KvlabError",
    "LayerObservation",
    "LoadedModel",
    "Policy",
    "RunResult",
    "Scorer",
    "Selector",
    "StepLayout",
    "build_prompt",
    "load_model",
    "load_policy",
    "prefill_and_compress",
    "run",
    "run_segments",
    "wrap_model",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvpress_lab' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # for type checkers and IDEs: the real imports
    from kvpress_lab.engine import RunResult, prefill_and_compress, run, run_segments
    from kvpress_lab.errors import ConfigError, InputError, KvlabError
    from kvpress_lab.interfaces import (
        Allocation,
        Budgeter,
        LayerObservation,
        Scorer,
        Selector,
        StepLayout,
    )
    from kvpress_lab.models import LoadedModel, load_model, wrap_model
    from kvpress_lab.policy import Composition, EngineOptions, Policy
    from kvpress_lab.prompt import build_prompt
    from kvpress_lab.spec import load_policy
