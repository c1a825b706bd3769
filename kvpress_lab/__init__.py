"""kvpress-lab: KV-cache compression policies for Hugging Face transformers.

Quick use::

    from kvpress_lab import load_model, run
    lm = load_model()                       # SmolLM2-135M-Instruct, or any HF causal LM
    result = run(lm, "snapkv:keep_ratio=0.25", context, question, answer_prefix="Answer:")
    print(result.answer, result.kept_tokens, result.kv_bytes_kept)
"""

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

__version__ = "0.1.0"

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
