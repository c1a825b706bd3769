"""Model adapters: the one place that knows transformers internals.

:func:`adapter_for` picks the adapter of a model's architecture (``config.model_type``) and
refuses unknown architectures with the list of supported ones. Scorers reach the adapter through
:class:`~kvpress_lab.interfaces.LayerObservation`; the engine uses it for every forward pass and
every cache operation.
"""

from __future__ import annotations

from torch import nn

from kvpress_lab.adapters.base import ModelAdapter, RopeSpec
from kvpress_lab.adapters.gemma import Gemma2Adapter, Gemma3Adapter
from kvpress_lab.adapters.llama import LlamaAdapter
from kvpress_lab.adapters.olmo2 import Olmo2Adapter
from kvpress_lab.adapters.phi3 import Phi3Adapter
from kvpress_lab.errors import ConfigError

__all__ = ["ADAPTERS", "ModelAdapter", "RopeSpec", "adapter_for", "supported_model_types"]

ADAPTERS: tuple[type[ModelAdapter], ...] = (
    LlamaAdapter,
    Phi3Adapter,
    Gemma2Adapter,
    Gemma3Adapter,
    Olmo2Adapter,
)


def supported_model_types() -> list[str]:
    return [t for cls in ADAPTERS for t in cls.model_types]


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``; a :class:`ConfigError` naming the supported ones otherwise."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if config is not None and hasattr(config, "get_text_config"):
        text_type = getattr(config.get_text_config(decoder=True), "model_type", None)
    else:
        text_type = None
    for cls in ADAPTERS:
        if model_type in cls.model_types or text_type in cls.model_types:
            return cls(model)
    raise ConfigError(
        f"architecture {model_type!r} ({type(model).__name__}) is not supported by kvpress-lab: "
        "its attention internals have no adapter, and a guess could compute wrong scores. "
        f"Supported: {', '.join(supported_model_types())}. Use one of those or add an adapter "
        "in kvpress_lab/adapters/"
    )
