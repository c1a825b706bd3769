"""Half precision: bf16 against fp32 on tiny models, and the drift of re-rotated bf16 keys.

Figures (kept-index overlap per policy, drift per number of moves) are printed with ``-s`` and
quoted in docs/models.md.
"""

from __future__ import annotations

import copy

import pytest
import torch

from kvpress_lab.adapters import RopeSpec, adapter_for
from kvpress_lab.engine.api import run_segments
from kvpress_lab.engine.runner import KeyOrigins, _rerotate_contiguous
from kvpress_lab.interfaces import StepLayout
from kvpress_lab.models import LoadedModel
from kvpress_lab.ops.rope import rerotate_keys
from kvpress_lab.prompt import PromptSegments
from kvpress_lab.spec import load_policy
from kvpress_lab.testing import tiny_model

POLICIES = [
    "snapkv:keep_ratio=0.25",
    "h2o:keep_ratio=0.25",
    "streamingllm:keep_ratio=0.25,block_size=64",
    "finch:keep_ratio=0.25,block_size=64",
    "laserkv:keep_ratio=0.25,block_size=128",
]


def _overlap(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Share of fp32's kept positions that bf16 keeps too, per (layer, KV head)."""
    return [
        len(set(a[i, h].tolist()) & set(b[i, h].tolist())) / a.shape[-1]
        for i in range(a.shape[0])
        for h in range(a.shape[1])
    ]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_bf16_keeps_nearly_the_tokens_fp32_keeps(arch):
    gen = torch.Generator().manual_seed(0)
    seg = PromptSegments(
        context_ids=torch.randint(3, 250, (600,), generator=gen),
        question_ids=torch.randint(3, 250, (12,), generator=gen),
    )
    fp32 = tiny_model(arch, seed=1, layers=4, heads=4, kv_heads=2)
    bf16 = LoadedModel(
        copy.deepcopy(fp32.model).to(torch.bfloat16),
        fp32.tokenizer,
        fp32.name,
        fp32.device,
        torch.bfloat16,
    )
    for spec in POLICIES:
        a = run_segments(fp32, load_policy(spec), seg, max_new_tokens=4)
        b = run_segments(bf16, load_policy(spec), seg, max_new_tokens=4)
        assert b.kept_tokens == a.kept_tokens
        overlap = _overlap(a.kept_indices, b.kept_indices)
        mean = sum(overlap) / len(overlap)
        print(f"{arch} {spec}: overlap mean {mean:.3f} min {min(overlap):.3f}")
        assert mean >= 0.8 and min(overlap) >= 0.75, (spec, mean, min(overlap))


def _drift(moves: int, one_step: bool) -> tuple[float, float]:
    """Relative error of bf16 keys moved ``moves`` times towards contiguous positions, against
    float64-exact rotation from the same start, and the error of one bf16 rounding (the floor)."""
    d = 64
    spec = RopeSpec(inv_freq=1.0 / (1e5 ** (torch.arange(0, d, 2).double() / d)), rotary_dim=d)
    gen = torch.Generator().manual_seed(0)
    pre = torch.randn(1, 2, 256, d, generator=gen, dtype=torch.float64)
    start = torch.arange(256) * 200
    path = [start - (start - torch.arange(256)) * t // moves for t in range(moves + 1)]
    exact = rerotate_keys(pre, torch.zeros(256, dtype=torch.long), path[-1], spec)
    computed = rerotate_keys(pre, torch.zeros(256, dtype=torch.long), start, spec)
    keys = computed.to(torch.bfloat16)
    if one_step:
        keys = rerotate_keys(keys, start, path[-1], spec)
    else:
        for old, new in zip(path[:-1], path[1:], strict=True):
            keys = rerotate_keys(keys, old, new, spec)
    err = float((keys.double() - exact).norm() / exact.norm())
    floor = float((exact.to(torch.bfloat16).double() - exact).norm() / exact.norm())
    return err, floor


@pytest.mark.parametrize("moves", [1, 16, 64])
def test_repeated_bf16_rerotation_drifts_and_one_step_does_not(moves):
    repeated, floor = _drift(moves, one_step=False)
    once, _ = _drift(moves, one_step=True)
    print(f"{moves} moves: repeated {repeated:.2e}, one step {once:.2e}, one rounding {floor:.2e}")
    assert once < 2 * floor
    if moves >= 16:
        assert repeated > 3 * floor  # the drift is real, hence KeyOrigins


def test_engine_rerotates_bf16_keys_from_their_computed_positions():
    """Sixteen compression steps through the engine's re-rotation with KeyOrigins: every kept key
    ends one rotation (one rounding) away from its computed value, however often it moved.
    Without KeyOrigins the same run ends at 4.5x one rounding (the check can fail)."""
    lm = tiny_model("llama", seed=0, layers=1, heads=2, kv_heads=1)
    adapter = adapter_for(lm.model)
    spec = adapter.rope(0)
    gen = torch.Generator().manual_seed(1)
    pre = torch.randn(1, 1, 6400, 16, generator=gen, dtype=torch.float64)

    class Cache:  # the adapter reads .layers[i].keys/.values
        def __init__(self):
            self.layers = [type("L", (), {})()]

    cache, origins = Cache(), KeyOrigins(adapter)
    kept_pre = pre[:, :, :0]
    n_past = 0
    for block in range(16):
        new_pre = pre[:, :, block * 400 : (block + 1) * 400]
        step_pre = torch.cat([kept_pre, new_pre], dim=2)
        n = step_pre.shape[2]
        # the model computed the new rows at positions n_past..n-1 (contiguous mode)
        new_keys = rerotate_keys(
            new_pre, torch.zeros(400, dtype=torch.long), torch.arange(n_past, n), spec
        ).to(torch.bfloat16)
        old_keys = cache.layers[0].keys if n_past else new_keys[:, :, :0]
        cache.layers[0].keys = torch.cat([old_keys, new_keys], dim=2)
        cache.layers[0].values = torch.zeros_like(cache.layers[0].keys)
        origins.add_new_rows(cache, n_past)
        # drop the oldest slot and 3 of every 4 new rows: every surviving key moves every step
        keep = torch.cat([torch.arange(min(1, n_past), n_past), torch.arange(n_past, n, 4)])[
            None, None
        ]
        cache.layers[0].keys = cache.layers[0].keys[:, :, keep[0, 0]]
        cache.layers[0].values = cache.layers[0].values[:, :, keep[0, 0]]
        layout = StepLayout(
            context_length=6400,
            block_index=block,
            n_blocks=16,
            block_start=block * 400,
            block_end=(block + 1) * 400,
            n_past=n_past,
            n_question=0,
            context_index=torch.arange(n)[None, None],
        )
        _rerotate_contiguous(adapter, cache, layout, layout.context_index, keep, origins)
        kept_pre = step_pre[:, :, keep[0, 0]]
        n_past = keep.shape[-1]
    exact = rerotate_keys(
        kept_pre, torch.zeros(n_past, dtype=torch.long), torch.arange(n_past), spec
    )
    err = float((cache.layers[0].keys.double() - exact).norm() / exact.norm())
    floor = float((exact.to(torch.bfloat16).double() - exact).norm() / exact.norm())
    assert err < 2 * floor, (err, floor)
