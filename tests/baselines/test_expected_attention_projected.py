"""Expected Attention reads the forward pass's own pre-RoPE queries (issue 14, part 4).

The scorer declares ``needs_projected_queries``: its query statistics come from the projection
the model computed, and the query projection never runs a second time. The reference is the same
scorer recomputing the queries from the layer input (the declaration switched off): kept indices
must be identical on every supported architecture, under both protocols.
"""

from __future__ import annotations

import pytest
import torch
from kvlab_plugins.expected_attention import ExpectedAttentionScorer

from kvpress_lab import build_prompt, prefill_and_compress
from kvpress_lab.adapters import ModelAdapter
from kvpress_lab.spec import load_policy
from kvpress_lab.testing import tiny_model
from kvpress_lab.testing.tiny import ARCHS

CONTEXT = (
    "Pack my box with five dozen liquor jugs; the jay, pig, fox, zebra and my wolves quack. " * 3
)
QUESTION = "What is packed?"
LAYERS = 2


def _kept_and_projections(lm, monkeypatch, query_agnostic: bool) -> tuple[torch.Tensor, int]:
    """Kept context indices of one expected_attention run and how often queries were projected."""
    calls = []
    project = ModelAdapter.project_queries

    def counting(self, layer, hidden):
        calls.append(layer)
        return project(self, layer, hidden)

    monkeypatch.setattr(ModelAdapter, "project_queries", counting)
    segments = build_prompt(lm.tokenizer, CONTEXT, QUESTION)
    policy = load_policy("expected_attention:keep_ratio=0.3")
    state = prefill_and_compress(lm, policy, segments, query_agnostic=query_agnostic)
    monkeypatch.setattr(ModelAdapter, "project_queries", project)
    return state.context_index, len(calls)


@pytest.mark.parametrize("query_agnostic", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_kept_indices_equal_recomputed_queries_and_no_second_projection(
    arch, query_agnostic, monkeypatch
):
    lm = tiny_model(arch, seed=4, layers=LAYERS, heads=4, kv_heads=2)
    kept, projections = _kept_and_projections(lm, monkeypatch, query_agnostic)
    assert projections == 0  # the pass's own queries, every layer
    monkeypatch.setattr(ExpectedAttentionScorer, "needs_projected_queries", False)
    reference, recomputed = _kept_and_projections(lm, monkeypatch, query_agnostic)
    assert recomputed == LAYERS  # the counter sees the recomputation it replaces
    assert kept.shape == reference.shape
    assert torch.equal(kept, reference)
