"""The pass's own pre-RoPE queries (``LayerObservation.projected_queries``).

A scorer declaring ``needs_projected_queries`` reads the query projection the model computed in
its forward pass (captured by a hook the adapter places), not a second projection of the rows.
The reference is ``adapter.project_queries`` on the layer input, on a tiny model of every
supported architecture (fused qkv, per-head and whole-projection query norms included); a scorer
that does not ask gets no output hook and nothing is held for it.
"""

from __future__ import annotations

import gc
import weakref
from typing import ClassVar

import pytest
import torch

from kvpress_lab.adapters import adapter_for
from kvpress_lab.adapters.llama import LlamaAdapter
from kvpress_lab.engine.observe import Observer
from kvpress_lab.interfaces import LayerObservation, Scorer
from kvpress_lab.testing import tiny_model
from kvpress_lab.testing.tiny import ARCHS

N = 120


class _Recorder(Scorer):
    """Records, per layer, what the observation offers against the adapter's recomputation."""

    name: ClassVar[str] = "recorder"

    def __init__(self, rows: slice) -> None:
        self.rows = rows
        self.seen: list[dict] = []

    def observe(self, obs: LayerObservation) -> None:
        rows = self.rows
        self.seen.append(
            {
                "captured": obs.projection is not None,
                "projected": obs.projected_queries(rows),
                "reference": obs.adapter.project_queries(obs.layer_idx, obs.hidden[:, rows]),
                "queries": obs.queries(rows),
                "rope_reference": obs.adapter.queries(
                    obs.layer_idx, obs.hidden[:, rows], obs.positions[rows]
                ),
            }
        )

    def score(self, layout, observed, candidates, cache_keys):  # never called here
        raise NotImplementedError


class _AskingRecorder(_Recorder):
    needs_projected_queries: ClassVar[bool] = True


def _observe_one_pass(lm, scorer: Scorer, adapter=None) -> list[bool]:
    """One forward pass of N random tokens under an Observer; the hooks' ``with_output`` flags."""
    adapter = adapter or adapter_for(lm.model)
    flags: list[bool] = []
    place = adapter.on_query_projection

    def recording(layer, fn, with_output=False):
        flags.append(with_output)
        return place(layer, fn, with_output=with_output)

    adapter.on_query_projection = recording  # instance attribute: this adapter only
    ids = torch.randint(3, 250, (N,), generator=torch.Generator().manual_seed(5))
    cache, positions = adapter.new_cache(), torch.arange(N)
    observer = Observer(adapter, cache, [("r", scorer)], None, positions, None, 16)
    with observer.attached(), torch.no_grad():
        adapter.forward(ids, cache, positions, positions)
    return flags


@pytest.mark.parametrize("arch", ARCHS)
def test_captured_queries_equal_the_adapters_projection(arch):
    lm = tiny_model(arch, seed=3, layers=2, heads=4, kv_heads=2)
    rows = slice(7, N - 5)  # not the whole pass: the capture is sliced like the hidden rows
    scorer = _AskingRecorder(rows)
    flags = _observe_one_pass(lm, scorer)
    assert flags == [True, True]  # one output hook per layer
    assert len(scorer.seen) == 2
    for layer, seen in enumerate(scorer.seen):
        assert seen["captured"], f"layer {layer}: the pass's projection was not captured"
        assert seen["projected"].shape == (1, 4, rows.stop - rows.start, 16)
        torch.testing.assert_close(seen["projected"], seen["reference"], rtol=1e-6, atol=1e-6)
        # RoPE on top of the captured queries: the adapter's own rotated queries
        torch.testing.assert_close(seen["queries"], seen["rope_reference"], rtol=1e-6, atol=1e-6)
        # the comparison can fail: the queries of the neighbouring rows differ clearly
        assert not torch.allclose(seen["projected"][:, :, 1:], seen["reference"][:, :, :-1])


def test_a_scorer_not_asking_gets_no_output_hook_and_no_capture():
    lm = tiny_model("qwen3", seed=3, layers=2, heads=4, kv_heads=2)
    scorer = _Recorder(slice(0, N))
    flags = _observe_one_pass(lm, scorer)
    assert flags == [False, False]  # input pre-hooks only: nothing of the output is kept
    assert [seen["captured"] for seen in scorer.seen] == [False, False]
    # recomputed instead, and still the adapter's queries
    for seen in scorer.seen:
        torch.testing.assert_close(seen["projected"], seen["reference"], rtol=0, atol=0)


def test_an_adapter_that_cannot_derive_queries_from_the_projection_recomputes_them():
    class ScaledQueries(LlamaAdapter):
        """A family whose queries are not the projection's output (projected twice as large)."""

        def project_queries(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
            return 2.0 * super().project_queries(layer, hidden)

    lm = tiny_model("llama", seed=3, layers=2, heads=4, kv_heads=2)
    assert adapter_for(lm.model).captures_projected_queries
    adapter = ScaledQueries(lm.model)
    assert not adapter.captures_projected_queries
    scorer = _AskingRecorder(slice(0, N))
    flags = _observe_one_pass(lm, scorer, adapter)
    assert flags == [False, False]
    for seen in scorer.seen:
        assert not seen["captured"]
        # the family's own queries, not the raw projection (which is half as large)
        torch.testing.assert_close(seen["projected"], seen["reference"], rtol=0, atol=0)


class _HeldChecker(Scorer):
    """Checks, at every layer, that no earlier layer's captured projection is still alive."""

    name: ClassVar[str] = "held"
    needs_projected_queries: ClassVar[bool] = True

    def __init__(self) -> None:
        self.refs: list[weakref.ref] = []
        self.alive_before: list[list[int]] = []

    def observe(self, obs: LayerObservation) -> None:
        gc.collect()
        self.alive_before.append([i for i, ref in enumerate(self.refs) if ref() is not None])
        self.refs.append(weakref.ref(obs.projection))
        obs.projected_queries(slice(0, obs.n_rows)).sum()  # read it, keep nothing

    def score(self, layout, observed, candidates, cache_keys):  # never called here
        raise NotImplementedError


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_a_layers_projection_is_released_once_it_is_observed(arch):
    lm = tiny_model(arch, seed=3, layers=3, heads=4, kv_heads=2)
    scorer = _HeldChecker()
    _observe_one_pass(lm, scorer)
    assert len(scorer.refs) == 3
    # one layer at a time: when layer l is observed, layers < l hold nothing any more
    assert scorer.alive_before == [[], [], []]
    gc.collect()
    assert [ref() is None for ref in scorer.refs] == [True, True, True]
