"""Forward hooks that let scorers observe each attention layer during a forward pass.

Hooks are registered for one forward pass and removed right after: nothing in transformers is
patched. The hook reads the attention module's inputs (post-norm hidden states and rotary
embeddings) and the layer's cache, so scoring never needs eager attention weights.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from kvpress_lab.errors import ConfigError
from kvpress_lab.interfaces import LayerObservation, Scorer, StepLayout
from kvpress_lab.ops.rope import apply_rope

__all__ = ["Observer", "attention_layers", "observation_from_hook", "rotary_function"]


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder layer, in order."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise ConfigError(
            f"{type(model).__name__} is not a supported architecture: kvpress-lab needs a decoder "
            "with model.layers[i].self_attn (llama, mistral, qwen2, qwen3, ...)"
        )
    return [layer.self_attn for layer in layers]


def rotary_function(attn: nn.Module) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The model family's own ``apply_rotary_pos_emb`` (falls back to the llama convention)."""
    fn = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)
    if fn is not None:
        return fn
    return lambda q, k, cos, sin: (apply_rope(q, cos, sin), apply_rope(k, cos, sin))


def observation_from_hook(
    module: nn.Module,
    layer_idx: int,
    n_layers: int,
    args: tuple,
    kwargs: dict,
    question_rows: slice | None,
    observation_window: int,
    layout: StepLayout | None,
) -> LayerObservation:
    """Build a :class:`LayerObservation` inside a forward hook on an attention module."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    cos, sin = kwargs["position_embeddings"]
    keys = kwargs["past_key_values"].layers[layer_idx].keys
    return LayerObservation(
        layer_idx=layer_idx,
        n_layers=n_layers,
        attn=module,
        hidden=hidden,
        cos=cos,
        sin=sin,
        keys=keys,
        n_past=int(keys.shape[2]) - int(hidden.shape[1]),
        question_rows=question_rows,
        observation_window=observation_window,
        apply_rotary=rotary_function(module),
        layout=layout,
    )


class Observer:
    """Collects each scorer's per-layer observations during one forward pass."""

    def __init__(
        self,
        model: nn.Module,
        scorers: Sequence[tuple[str, Scorer]],
        layout: StepLayout,
        question_rows: slice | None,
        observation_window: int,
    ) -> None:
        self.attn_layers = attention_layers(model)
        self.scorers = [(name, s) for name, s in scorers if s.needs_observation]
        self.layout = layout
        self.question_rows = question_rows
        self.observation_window = observation_window
        self.observed: dict[str, list[torch.Tensor | None]] = {
            name: [None] * len(self.attn_layers) for name, _ in scorers
        }
        self.seconds = 0.0  # time spent in scorers, reported as compression time

    @contextlib.contextmanager
    def attached(self) -> Iterator[Observer]:
        if not self.scorers:
            yield self
            return
        handles = [
            attn.register_forward_hook(self._make_hook(i), with_kwargs=True)
            for i, attn in enumerate(self.attn_layers)
        ]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _make_hook(self, layer_idx: int):
        n_layers = len(self.attn_layers)

        def hook(module, args, kwargs, output):
            start = time.perf_counter()
            obs = observation_from_hook(
                module,
                layer_idx,
                n_layers,
                args,
                kwargs,
                question_rows=self.question_rows,
                observation_window=self.observation_window,
                layout=self.layout,
            )
            hidden = obs.hidden
            with torch.no_grad():
                for name, scorer in self.scorers:
                    self.observed[name][layer_idx] = scorer.observe(obs)
            if hidden.device.type == "cuda":
                torch.cuda.synchronize(hidden.device)
            self.seconds += time.perf_counter() - start

        return hook
