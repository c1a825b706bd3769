"""Let scorers observe each attention layer during one forward pass.

Hooks are registered for one forward pass and removed right after: nothing in transformers is
patched. Where to hook and how to read a layer is the adapter's knowledge: a hook on the layer's
query projection captures the attention input (an ``nn.Linear``'s positional input, the same in
every release), and a hook on the attention module fires once the layer's keys are in the cache,
which the engine owns and reads through the adapter. Positions are the ones the engine fed.

When a scorer declares :attr:`~kvpress_lab.interfaces.Scorer.needs_projected_queries`, the
projection hook runs after the projection and also keeps its output, the pass's own queries
(:attr:`~kvpress_lab.interfaces.LayerObservation.projection`). Both captures of a layer are
released as soon as that layer has been observed, so at most one layer's are held at a time
(the layer being computed, plus the one being observed).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence

import torch

from kvpress_lab.adapters import ModelAdapter
from kvpress_lab.interfaces import LayerObservation, Scorer, StepLayout

__all__ = ["Observer"]


class Observer:
    """Collects each scorer's per-layer observations during one forward pass."""

    def __init__(
        self,
        adapter: ModelAdapter,
        cache: object,
        scorers: Sequence[tuple[str, Scorer]],
        layout: StepLayout | None,
        positions: torch.Tensor,
        question_rows: slice | None,
        observation_window: int,
        after_layer: Callable[[int], None] | None = None,
    ) -> None:
        self.adapter = adapter
        # called with the layer index once the layer's scorers have observed it (layer-wise
        # compression replaces the layer's cache there)
        self.after_layer = after_layer
        self.cache = cache
        self.scorers = [(name, s) for name, s in scorers if s.needs_observation]
        self.layout = layout
        self.positions = positions
        self.question_rows = question_rows
        self.observation_window = observation_window
        self.observed: dict[str, list[torch.Tensor | None]] = {
            name: [None] * adapter.n_layers for name, _ in scorers
        }
        self._host_seconds = 0.0  # time spent in scorers, measured on the host
        # on CUDA, (start, end) events around every layer's scorers: recording an event does not
        # wait for the GPU, so the forward pass is never synchronised layer by layer
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._hidden: list[torch.Tensor | None] = [None] * adapter.n_layers
        # the query projection's output per layer, kept only when a scorer asks for it
        self.captures_queries = adapter.captures_projected_queries and any(
            s.needs_projected_queries for _, s in self.scorers
        )
        self._projection: list[torch.Tensor | None] = [None] * adapter.n_layers
        # True while scorers run: projections they compute themselves (e.g. a kvpress scorer
        # calling the module's q_proj) must not be taken for the pass's
        self._observing = False

    def signature(self) -> str:
        """What the observations depend on besides the pass: equal signatures, equal results.

        The scorers' names and settings (attrs reprs: the config record; a scorer without one
        shows its identity, so it is never shared), which rows are the question or the
        observation window, and the step (its layout object).
        """
        return repr(
            (
                sorted(self.observed),
                self.scorers,
                self.question_rows,
                self.observation_window,
                id(self.layout),
                self.after_layer is None,
            )
        )

    @property
    def seconds(self) -> float:
        """Time spent in scorers during the pass, reported as compression time.

        On CUDA the per-layer events are read here, after the engine's one synchronisation at
        the end of the phase (reading them waits for the last one, never for a layer mid-pass).
        """
        if not self._events:
            return self._host_seconds
        self._events[-1][1].synchronize()
        return sum(start.elapsed_time(end) for start, end in self._events) / 1000.0

    @contextlib.contextmanager
    def attached(self) -> Iterator[Observer]:
        if not self.scorers and self.after_layer is None:
            yield self
            return
        handles = []
        for i in range(self.adapter.n_layers):
            if self.scorers:
                handles.append(
                    self.adapter.on_query_projection(
                        i, self._capture(i), with_output=self.captures_queries
                    )
                )
            handles.append(self.adapter.on_attention_done(i, self._observe(i)))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._hidden = [None] * self.adapter.n_layers
            self._projection = [None] * self.adapter.n_layers

    def _capture(self, layer_idx: int):
        def capture(hidden: torch.Tensor, projected: torch.Tensor | None) -> None:
            if not self._observing:
                self._hidden[layer_idx] = hidden
                self._projection[layer_idx] = projected

        return capture

    def _observe(self, layer_idx: int):
        def hook() -> None:
            if self.scorers:
                hidden, projection = self._hidden[layer_idx], self._projection[layer_idx]
                self._hidden[layer_idx] = self._projection[layer_idx] = None
                self.observe_layer(layer_idx, hidden, projection)
            if self.after_layer is not None:
                self.after_layer(layer_idx)

        return hook

    def observe_layer(
        self, layer_idx: int, hidden: torch.Tensor, projection: torch.Tensor | None = None
    ) -> None:
        """Run the scorers on ``layer_idx`` for the rows ``hidden`` (the last rows of its cache).

        Called by the forward hook, or by the engine after the pass for rows it recorded itself
        (generation-time compression observes the rows of several single-token passes at once;
        no ``projection`` then: scorers' queries are recomputed from ``hidden``).
        """
        cuda = hidden.device.type == "cuda"
        if cuda:
            events = (
                torch.cuda.Event(enable_timing=True),
                torch.cuda.Event(enable_timing=True),
            )
            events[0].record()
        else:
            start = time.perf_counter()
        keys, values = self.adapter.layer_kv(self.cache, layer_idx)
        obs = LayerObservation(
            layer_idx=layer_idx,
            n_layers=self.adapter.n_layers,
            adapter=self.adapter,
            hidden=hidden,
            positions=self.positions,
            keys=keys,
            values=values,
            n_past=int(keys.shape[2]) - int(hidden.shape[1]),
            question_rows=self.question_rows,
            observation_window=self.observation_window,
            layout=self.layout,
            projection=projection,
        )
        self._observing = True
        try:
            with torch.no_grad():
                for name, scorer in self.scorers:
                    self.observed[name][layer_idx] = scorer.observe(obs)
        finally:
            self._observing = False
        if cuda:
            events[1].record()
            self._events.append(events)
        else:
            self._host_seconds += time.perf_counter() - start
