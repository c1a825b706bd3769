"""The shared model adapter: everything the engine and plugins need to know about a model.

This package is the only code in kvpress-lab that knows transformers internals: where the
attention layers are, what their input is, how queries are projected, normalised and rotated,
how attention is scaled and capped, which layers slide, how a cache layer stores keys and values,
and which keyword the model's forward takes for the cache. Family modules override the few
methods where an architecture differs; everything else reads the shared behaviour here.

Hooks registered here use only ``nn.Linear``'s positional input (stable across releases) and
never read forward-hook keyword names; positions come from the engine, which feeds them.
"""

from __future__ import annotations

import copy
import inspect
import sys
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import attrs
import torch
from torch import nn

from kvpress_lab.adapters.ragged_attention import ragged_attention_for
from kvpress_lab.adapters.ragged_cache import RaggedCache, ragged_from_dense
from kvpress_lab.errors import ConfigError

__all__ = ["ModelAdapter", "RopeSpec"]

RotaryFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@attrs.frozen
class RopeSpec:
    """How one layer's keys are rotated: enough to re-rotate cached keys by a position delta.

    ``inv_freq`` holds ``rotary_dim / 2`` frequencies; the first ``rotary_dim`` channels of a head
    are rotated (partial rotary leaves the rest untouched). ``convention`` is ``"rotate_half"``
    (pairs ``i`` and ``i + rotary_dim/2``) or ``"interleaved"`` (pairs ``2i`` and ``2i + 1``).
    """

    inv_freq: torch.Tensor
    rotary_dim: int
    convention: str = "rotate_half"
    rope_type: str = "default"


class ModelAdapter:
    """Model knowledge for one loaded model; families subclass it and override what differs."""

    family: ClassVar[str] = "llama"
    model_types: ClassVar[tuple[str, ...]] = ()
    # what the family's attention does that the engine must reproduce when scoring
    features: ClassVar[tuple[str, ...]] = ()
    # attention implementations whose semantics the engine's position layout may break
    _PACKED_POSITION_BACKENDS: ClassVar[tuple[str, ...]] = (
        "flash_attention_2",
        "flash_attention_3",
    )

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config.get_text_config(decoder=True)
        self.decoder = self._decoder(model)
        self.layers = list(self.decoder.layers)
        self.n_layers = len(self.layers)
        self.n_heads = int(self.config.num_attention_heads)
        self.n_kv_heads = int(getattr(self.config, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(
            getattr(self.config, "head_dim", None) or self.config.hidden_size // self.n_heads
        )
        self._cache_kwarg = self._find_cache_kwarg(model)

    # ---------------------------------------------------------------- structure
    @staticmethod
    def _decoder(model: nn.Module) -> nn.Module:
        inner = getattr(model, "model", model)
        inner = getattr(inner, "language_model", inner)
        if getattr(inner, "layers", None) is None:
            raise ConfigError(
                f"{type(model).__name__} has no decoder layer stack (model.layers); kvpress-lab "
                "supports decoder-only causal LMs"
            )
        return inner

    def attention(self, layer: int) -> nn.Module:
        """The self-attention module of decoder layer ``layer``."""
        return self.layers[layer].self_attn

    def query_projection(self, layer: int) -> nn.Module:
        """The linear layer whose input is the attention input (hooked to capture it)."""
        return self.attention(layer).q_proj

    def on_query_projection(
        self,
        layer: int,
        fn: Callable[[torch.Tensor, torch.Tensor | None], None],
        with_output: bool = False,
    ) -> Any:
        """Call ``fn(hidden, projected)`` each time ``layer``'s query projection runs.

        ``hidden`` is the attention input [B, n, hidden_size] (the projection's positional
        input). With ``with_output`` the hook runs after the projection and ``projected`` is its
        output as the model computed it (hand it to :meth:`queries_from_projection`); without,
        it runs before and ``projected`` is None, so nothing is kept alive that the model would
        have freed. Returns a handle (``.remove()``).
        """
        module = self.query_projection(layer)
        if with_output:
            return module.register_forward_hook(lambda mod, args, out: fn(args[0], out))
        return module.register_forward_pre_hook(lambda mod, args: fn(args[0], None))

    @property
    def captures_projected_queries(self) -> bool:
        """Whether :meth:`queries_from_projection` turns a captured projection into queries.

        True for every shipped family. A family that overrides :meth:`project_queries` but not
        :meth:`queries_from_projection` computes its queries some other way, so the engine
        recomputes them from the attention input instead of trusting the captured output.
        """
        cls = type(self)
        return (
            cls.project_queries is ModelAdapter.project_queries
            or cls.queries_from_projection is not ModelAdapter.queries_from_projection
        )

    def on_attention_done(self, layer: int, fn: Callable[[], None]) -> Any:
        """Call ``fn()`` each time ``layer``'s attention has run; returns a handle (``.remove()``).

        When ``fn`` runs, the layer's keys and values of the pass are in the cache and nothing
        later in the pass reads them (a decoder layer attends over its own cache slots only, and
        the masks were built before the first layer), so ``fn`` may replace the layer's cache
        with :meth:`set_layer_kv`: this is where the engine compresses a layer during prefill.
        """
        return self.attention(layer).register_forward_hook(lambda module, args, output: fn())

    def project_queries(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Queries before RoPE, [B, H_q, r, head_dim], normalised as the family does."""
        # .forward: no hooks, so recomputing queries never feeds an observer's capture
        projected = self.query_projection(layer).forward(hidden)
        return self.queries_from_projection(layer, projected)

    def queries_from_projection(self, layer: int, projected: torch.Tensor) -> torch.Tensor:
        """Pre-RoPE queries [B, H_q, r, head_dim] from the query projection's output [B, r, out].

        What the attention does between its query projection and RoPE (split into heads, the
        family's query norm), so the projection the model computed in its own forward
        (:meth:`on_query_projection`) gives the same queries as :meth:`project_queries`.
        """
        q = projected.view(*projected.shape[:2], -1, self.head_dim)
        q_norm = getattr(self.attention(layer), "q_norm", None)
        if q_norm is not None:  # per-head norm (qwen3, gemma3); .forward: no hooks
            q = q_norm.forward(q)
        return q.transpose(1, 2)

    # ---------------------------------------------------------------- positions
    def rotary_module(self) -> nn.Module:
        return self.decoder.rotary_emb

    def layer_type(self, layer: int) -> str:
        types = getattr(self.config, "layer_types", None)
        return types[layer] if types else "full_attention"

    def rotary(self, layer: int, positions: torch.Tensor, like: torch.Tensor):
        """(cos, sin) of ``positions`` [r] for ``layer``, shaped [1, r, rotary_dim]."""
        return self.rotary_module()(like, positions.to(like.device)[None])

    def _apply_rotary_fn(self, layer: int) -> RotaryFn:
        module = sys.modules[type(self.attention(layer)).__module__]
        return module.apply_rotary_pos_emb

    def queries(self, layer: int, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Queries of ``hidden`` rows at ``positions``, exactly as the attention forms them."""
        return self.rotate_queries(layer, self.project_queries(layer, hidden), positions)

    def rotate_queries(self, layer: int, q: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """RoPE of pre-RoPE queries ``q`` [B, H_q, r, head_dim] at ``positions`` [r]."""
        cos, sin = self.rotary(layer, positions, q)
        # the family's own RoPE function also rotates a key: hand it one head so that costs nothing
        q, _ = self._apply_rotary_fn(layer)(q, q[:, :1], cos.to(q.dtype), sin.to(q.dtype))
        return q

    def attention_call(
        self, layer: int, hidden: torch.Tensor, positions: torch.Tensor, n_past: int
    ) -> tuple[nn.Module, dict[str, Any]]:
        """What scoring code written against a transformers attention module receives.

        Third-party scorers (NVIDIA kvpress's ``ScorerPress.score(module, hidden_states, ...)``)
        read the attention module and the keyword arguments of its forward. Returns a shallow
        *view* of ``layer``'s attention module (same class, parameters and submodules, plus the
        model's rotary embedding as ``rotary_emb``, which kvpress attaches to every layer) so the
        model itself is never modified, and the forward's keyword arguments for ``hidden`` rows
        at ``positions``: ``position_embeddings`` (cos, sin), ``position_ids`` and
        ``cache_position`` (the rows' cache slots, after ``n_past`` carried slots).
        """
        attn = self.attention(layer)
        view = object.__new__(type(attn))
        view.__dict__.update(attn.__dict__)
        view.__dict__["_modules"] = {**attn._modules, "rotary_emb": self.rotary_module()}
        positions = positions.to(hidden.device)
        slots = torch.arange(n_past, n_past + hidden.shape[1], device=hidden.device)
        kwargs = {
            "position_embeddings": self.rotary(layer, positions, hidden),
            "position_ids": positions[None],
            "cache_position": slots,
        }
        return view, kwargs

    def rope(self, layer: int) -> RopeSpec | None:
        """The rotation applied to ``layer``'s keys, or None for a layer without RoPE."""
        rot = self.rotary_module()
        inv_freq = getattr(rot, "inv_freq", None)
        if not isinstance(inv_freq, torch.Tensor):
            raise ConfigError(
                f"{self.family}: the rotary embedding {type(rot).__name__} exposes no inv_freq; "
                "key re-rotation is not supported for this model"
            )
        return RopeSpec(
            inv_freq=inv_freq, rotary_dim=2 * inv_freq.numel(), rope_type=self._rope_type(rot)
        )

    @staticmethod
    def _rope_type(rot: nn.Module, layer_type: str | None = None) -> str:
        rope_type = getattr(rot, "rope_type", None)
        if isinstance(rope_type, dict):
            rope_type = rope_type.get(layer_type)
        return str(rope_type or "default")

    # ---------------------------------------------------------------- attention arithmetic
    def scaling(self, layer: int) -> float:
        return float(self.attention(layer).scaling)

    def logit_softcap(self, layer: int) -> float | None:
        return getattr(self.attention(layer), "attn_logit_softcapping", None)

    def sliding_window(self, layer: int) -> int | None:
        """The window of a sliding-window layer, None for full attention."""
        attn = self.attention(layer)
        if hasattr(attn, "sliding_window"):  # families with per-layer types (qwen2/3, gemma)
            return attn.sliding_window
        # mistral, phi3: one window in the config for every layer
        return getattr(self.config, "sliding_window", None)

    def attention_logits(self, layer: int, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Scaled (and soft-capped) logits [B, H, G, r, N] in float32; keys never repeated."""
        b, hq, r, d = q.shape
        h = keys.shape[1]
        g = hq // h
        # scaling the queries ([r, d]) rather than the logits ([r, N]) saves a pass over the
        # largest tensor; with a power-of-two scale (head_dim 16, 64, 256) the result is the same
        # bit for bit
        scaled = q.float().reshape(b, h, g * r, d) * self.scaling(layer)
        logits = torch.matmul(scaled, keys.float().transpose(-1, -2)).view(b, h, g, r, -1)
        cap = self.logit_softcap(layer)
        if cap:
            logits = logits.div_(cap).tanh_().mul_(cap)
        return logits

    # ---------------------------------------------------------------- cache
    def new_cache(self):
        """An empty cache with a full (non-sliding) layer per decoder layer.

        Sliding layers would drop keys behind the engine's back; the engine refuses runs longer
        than a sliding window instead (:meth:`check_run`), so full layers are always correct.
        """
        from transformers import DynamicCache

        return DynamicCache()

    @staticmethod
    def layer_kv(cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(cache, RaggedCache):
            raise ConfigError(
                f"layer {layer} of a ragged cache has no dense [B, H, N, d] keys (its heads hold "
                f"{cache.head_lengths(layer)} tokens); read one head with head_kv(cache, layer, "
                "head) instead"
            )
        lay = cache.layers[layer]
        return lay.keys, lay.values

    # ---------------------------------------------------------------- ragged (per-head) cache
    @staticmethod
    def ragged_cache(
        cache: Any,
        keep: Sequence[Sequence[torch.Tensor]],
        positions: torch.Tensor | None = None,
    ) -> RaggedCache:
        """A ragged cache holding, for layer ``l`` and KV head ``h``, the slots ``keep[l][h]``.

        ``cache`` is a dense cache (this adapter's :meth:`new_cache` after a forward pass);
        ``positions`` are its slots' original positions (default ``0..N-1``). Heads keep their own
        number of tokens, stored packed; forward passes over the result attend each query head
        to its KV head's tokens (:mod:`kvpress_lab.adapters.ragged_attention`).
        """
        n_layers = len(cache.layers)
        dense = [ModelAdapter.layer_kv(cache, layer) for layer in range(n_layers)]
        return ragged_from_dense(dense, keep, positions)

    @staticmethod
    def is_ragged(cache: Any) -> bool:
        return isinstance(cache, RaggedCache)

    @staticmethod
    def head_lengths(cache: Any, layer: int) -> list[int]:
        """Tokens held by each KV head of ``layer`` (all equal for a dense cache)."""
        if isinstance(cache, RaggedCache):
            return cache.head_lengths(layer)
        keys = cache.layers[layer].keys
        return [ModelAdapter.cache_length(cache, layer)] * int(keys.shape[1])

    @staticmethod
    def head_kv(cache: Any, layer: int, head: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[L_h, head_dim]`` of KV head ``head`` of ``layer``."""
        if isinstance(cache, RaggedCache):
            return cache.layers[layer].head_kv(head)
        lay = cache.layers[layer]
        return lay.keys[0, head], lay.values[0, head]

    @staticmethod
    def head_positions(cache: Any, layer: int, head: int) -> torch.Tensor:
        """Original positions of a ragged cache's head ``head`` of ``layer``, in cache order."""
        if not isinstance(cache, RaggedCache):
            raise ConfigError(
                "head_positions needs a ragged cache; a dense cache keeps no positions"
            )
        return cache.layers[layer].head_positions(head)

    @staticmethod
    def set_layer_kv(cache: Any, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        lay = cache.layers[layer]
        lay.keys, lay.values = keys, values

    @staticmethod
    def cache_length(cache: Any, layer: int = 0) -> int:
        """Tokens in ``layer``'s cache; for a ragged cache, the longest head's count."""
        if layer >= len(cache.layers):
            return 0
        if isinstance(cache, RaggedCache):
            return cache.layers[layer].get_seq_length()
        keys = getattr(cache.layers[layer], "keys", None)
        return 0 if keys is None or keys.dim() < 3 else int(keys.shape[-2])

    @staticmethod
    def kv_bytes(cache: Any) -> int:
        """Bytes held by the keys and values of every layer.

        For a ragged cache: the bytes its storages allocate (packed heads plus the spare capacity
        of the decode tail; :meth:`RaggedCache.compact` drops the spare).
        """
        if isinstance(cache, RaggedCache):
            return cache.kv_bytes()
        total = 0
        for lay in cache.layers:
            keys = getattr(lay, "keys", None)
            if keys is not None and keys.numel():
                total += keys.numel() * keys.element_size()
                total += lay.values.numel() * lay.values.element_size()
        return total

    @staticmethod
    def copy_cache(cache: Any) -> Any:
        """A cache whose layers are new objects pointing at the same tensors.

        A ragged cache shares its packed bodies (never written in place) and copies its decode
        tails (appended in place), so appending to either copy leaves the other unchanged.
        """
        if isinstance(cache, RaggedCache):
            return cache.copy()
        new = copy.copy(cache)
        new.layers = [copy.copy(layer) for layer in cache.layers]
        return new

    # ---------------------------------------------------------------- forward
    @staticmethod
    def _find_cache_kwarg(model: nn.Module) -> str:
        # transformers 5.24 renamed past_key_values to cache; older releases only know the former
        params = inspect.signature(model.forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: Any,
        positions: torch.Tensor,
        slots: torch.Tensor,
        logits_to_keep: int = 1,
    ) -> torch.Tensor:
        """Run the model over ``input_ids`` [n] at ``positions``, cache slots ``slots``.

        Returns the last ``logits_to_keep`` rows of logits, [logits_to_keep, vocab]. Over a
        ragged cache the pass attends through :mod:`~kvpress_lab.adapters.ragged_attention`
        (``slots`` are then unused: each head appends after its own tokens).
        """
        if isinstance(cache, RaggedCache):
            cache.next_positions = positions
            with ragged_attention_for(self.model.config):
                return self._forward(input_ids, cache, positions, slots, logits_to_keep)
        return self._forward(input_ids, cache, positions, slots, logits_to_keep)

    def _forward(
        self,
        input_ids: torch.Tensor,
        cache: Any,
        positions: torch.Tensor,
        slots: torch.Tensor,
        logits_to_keep: int,
    ) -> torch.Tensor:
        kwargs = {self._cache_kwarg: cache}
        out = self.model(
            input_ids=input_ids[None],
            position_ids=positions[None],
            cache_position=slots,
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        return out.logits[0]

    # ---------------------------------------------------------------- what is supported
    def attn_implementation(self) -> str:
        return str(getattr(self.config, "_attn_implementation", None) or "eager")

    def check_run(self, total_tokens: int, position_jumps: bool, rerotates: bool) -> None:
        """Refuse, before any model work, a run this adapter cannot make exact.

        ``total_tokens``: most positions the run spans (context + question + answer).
        ``position_jumps``: a forward pass feeds non-contiguous positions (block-wise prefill
        with the question appended at its final position).
        ``rerotates``: kept keys are moved to new positions.
        """
        name = self.family_label()
        for layer in range(self.n_layers):
            window = self.sliding_window(layer)
            if window is not None and total_tokens > window:
                raise ConfigError(
                    f"{name}: layer {layer} attends through a sliding window of {window} tokens, "
                    f"but this run spans {total_tokens}; compressing sliding-window layers is not "
                    f"supported yet. Use a context of at most {window} tokens (including question "
                    "and answer) or a model without sliding-window attention"
                )
        impl = self.attn_implementation()
        if position_jumps and impl in self._PACKED_POSITION_BACKENDS:
            raise ConfigError(
                f"{name}: attn_implementation={impl!r} reads non-contiguous position ids as packed "
                "sequences, and block-wise prefill feeds the question at its final position; use "
                "--attn sdpa for block-wise policies (SDPA uses flash kernels on CUDA too) or a "
                "one-shot policy"
            )
        if rerotates:
            for layer in range(self.n_layers):
                spec = self.rope(layer)
                if spec is not None and "dynamic" in spec.rope_type:
                    raise ConfigError(
                        f"{name}: rope_type {spec.rope_type!r} recomputes its frequencies from "
                        "the sequence length, so keys cannot be re-rotated exactly; use a policy "
                        "that keeps original positions (e.g. position_mode original)"
                    )

    def family_label(self) -> str:
        model_type = getattr(self.config, "model_type", "?")
        return f"{model_type} ({self.family} adapter)"
