"""Every shipped policy ends on the policy-independent target floor(r L), run through the engine.

The kept count is read from the model's cache after prefill and compression (slots per layer),
not from any policy's own prediction.
"""

from __future__ import annotations

import math

import attrs
import pytest
import torch
from tiny import tiny_model

from kvpress_lab.adapters import ModelAdapter
from kvpress_lab.engine.runner import prefill_and_compress
from kvpress_lab.prompt import PromptSegments
from kvpress_lab.registry import default_registry
from kvpress_lab.spec import load_policy

Q = 5


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", seed=0, layers=2)


def _segments(L: int, seed: int = 0) -> PromptSegments:
    gen = torch.Generator().manual_seed(seed)
    return PromptSegments(
        torch.randint(3, 250, (L,), generator=gen), torch.randint(3, 250, (Q,), generator=gen)
    )


def _cache_slots(cache) -> list[int]:
    """Slots held per layer, read from the key tensors themselves."""
    return [int(layer.keys.shape[-2]) for layer in cache.layers]


def _kept(lm, policy, L: int) -> float:
    state = prefill_and_compress(lm, policy, _segments(L))
    index = state.context_index
    if state.kept_counts is not None:  # per-layer / per-head budgets: a ragged cache
        return _kept_ragged(state, L)
    kept = int(index.shape[-1])
    question_slots = Q if state.question_logits is not None else 0
    assert set(_cache_slots(state.cache)) == {kept + question_slots}
    assert bool(((index >= 0) & (index < L)).all())
    assert bool((index.diff(dim=-1) > 0).all()), "kept positions are not unique and ordered"
    return kept


def _kept_ragged(state, L: int) -> float:
    """Mean kept tokens per layer and KV head, read from the ragged cache's own head lengths."""
    counts = state.kept_counts
    question_slots = Q if state.question_logits is not None else 0
    for layer in range(counts.shape[0]):
        held = ModelAdapter.head_lengths(state.cache, layer)
        assert held == (counts[layer] + question_slots).tolist()
        for head in range(counts.shape[1]):
            row = state.context_index[layer, head, : int(counts[layer, head])]
            assert bool(((row >= 0) & (row < L)).all())
            assert bool((row.diff() > 0).all()), "kept positions are not unique and ordered"
    return float(counts.double().mean())


@pytest.mark.parametrize(
    ("r", "L", "S"),
    [
        # the paper's arithmetic keeps all 2048 here (B = 2*0.75*4096*2048/6144 = 2048 = L)
        (0.75, 2048, 4096),
        # ... and 62 here (a short last block after four blocks of G = 13, a = w = 5)
        (0.3, 200, 48),
        (0.1, 1000, 256),
        (0.5, 777, 100),
        (0.9, 300, 64),
    ],
)
def test_laserkv_keeps_floor_r_l_through_the_engine(lm, r, L, S):
    policy = load_policy(f"laserkv:keep_ratio={r},block_size={S},lsh_bits=4")
    assert _kept(lm, policy, L) == math.floor(r * L)


def _compressing() -> list[str]:
    return [n for n in default_registry().names("policy") if n != "full"]


@pytest.mark.parametrize("name", _compressing())
@pytest.mark.parametrize("L", [200, 1000])
@pytest.mark.parametrize("r", [0.1, 0.3, 0.75])
def test_every_shipped_policy_meets_the_target_within_one_percent(lm, name, L, r):
    target = math.floor(r * L)
    cls = default_registry().policy_class(name)
    # one-shot as shipped, and block-wise with several blocks where the policy has a block size
    block_sizes = [None, 48] if "block_size" in attrs.fields_dict(cls) else [None]
    for S in block_sizes:
        policy = (
            load_policy(name, keep_ratio=r)
            if S is None
            else load_policy(name, keep_ratio=r, block_size=S)
        )
        kept = _kept(lm, policy, L)
        assert abs(kept - target) <= 0.01 * target, f"{name} block_size={S}: {kept} vs {target}"
