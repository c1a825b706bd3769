"""The architecture matrix: every supported family, on tiny random in-process models (GQA on),
checked against references that do not go through the adapter under test:

- keep-everything runs (one-shot, block-wise at original positions, block-wise re-rotated)
  answer token for token like greedy decoding that recomputes the whole sequence each step;
- the exact scorer equals the attention weights of transformers' eager attention, summed;
- re-rotated keys equal the keys the model itself computes at the shifted positions;
- unsupported settings are refused before any model work, naming the problem and the fix.
"""

from __future__ import annotations

import pytest
import torch
from kvlab_plugins.exact import ExactScorer

from kvpress_lab.adapters import adapter_for, supported_model_types
from kvpress_lab.engine.api import run_segments
from kvpress_lab.engine.observe import Observer
from kvpress_lab.errors import ConfigError
from kvpress_lab.ops.rope import rerotate_keys
from kvpress_lab.prompt import PromptSegments
from kvpress_lab.spec import load_policy
from kvpress_lab.testing import tiny_model
from kvpress_lab.testing.tiny import ARCHS

L, Q, NEW = 150, 9, 6


def _segments(seed: int = 0) -> PromptSegments:
    gen = torch.Generator().manual_seed(seed)
    ctx = torch.randint(3, 250, (L,), generator=gen)
    question = torch.randint(3, 250, (Q,), generator=gen)
    return PromptSegments(context_ids=ctx, question_ids=question)


@torch.no_grad()
def _greedy_by_recompute(model, ids: torch.Tensor, n: int) -> list[int]:
    """Greedy tokens from full recomputation (no cache at all): the independent reference."""
    out: list[int] = []
    seq = ids.clone()
    for _ in range(n):
        logits = model(input_ids=seq[None], use_cache=False).logits[0, -1]
        token = int(torch.argmax(logits))
        out.append(token)
        seq = torch.cat([seq, torch.tensor([token])])
    return out


@pytest.fixture(scope="module", params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def lm(arch):
    return tiny_model(arch, seed=7, layers=2, heads=4, kv_heads=2)


KEEP_ALL = {
    "one-shot": "snapkv:keep_ratio=1",
    "block-wise original positions": "laserkv:keep_ratio=1,block_size=48",
    "block-wise re-rotated": "streamingllm:keep_ratio=1,block_size=48",
}


@pytest.mark.parametrize("mode", list(KEEP_ALL))
def test_keep_everything_answers_like_full_recomputation(lm, mode):
    seg = _segments()
    expected = _greedy_by_recompute(lm.model, torch.cat([seg.context_ids, seg.question_ids]), NEW)
    result = run_segments(lm, load_policy(KEEP_ALL[mode]), seg, max_new_tokens=NEW)
    assert result.kept_tokens == L
    assert result.answer_token_ids == expected


@pytest.mark.parametrize(
    "policy",
    [
        "snapkv:keep_ratio=0.3",
        "h2o:keep_ratio=0.3",
        "laserkv:keep_ratio=0.3,block_size=48",
        "finch:keep_ratio=0.3,block_size=48",
        "streamingllm:keep_ratio=0.3,block_size=48",
    ],
)
def test_compressing_policies_run_and_keep_the_target(lm, policy):
    seg = _segments(1)
    result = run_segments(lm, load_policy(policy), seg, max_new_tokens=3)
    assert result.kept_tokens == int(0.3 * L)
    assert result.kept_indices.shape[-1] == int(0.3 * L)
    assert len(result.answer_token_ids) == 3


@torch.no_grad()
def test_exact_scorer_equals_eager_brute_force(arch):
    """Sum over layers, query heads and question rows of eager softmax attention."""
    seg = _segments(2)
    ids = torch.cat([seg.context_ids, seg.question_ids])
    n = int(ids.numel())
    lm = tiny_model(arch, seed=11, layers=2, heads=4, kv_heads=2)  # SDPA: no weights returned
    eager = tiny_model(arch, seed=11, layers=2, heads=4, kv_heads=2, attn="eager")
    weights = eager.model(input_ids=ids[None], output_attentions=True).attentions
    reference = sum(w[0, :, L:, :].double().sum(dim=(0, 1)) for w in weights)  # [n]

    adapter = adapter_for(lm.model)
    cache = adapter.new_cache()
    positions = torch.arange(n)
    scorer = ExactScorer()
    observer = Observer(adapter, cache, [("exact", scorer)], None, positions, slice(L, n), Q)
    with observer.attached():
        adapter.forward(ids, cache, positions, positions)
    got = scorer.score(None, observer.observed["exact"], None, None).view(-1)
    assert got.shape == (n,)
    torch.testing.assert_close(got.double(), reference, atol=1e-4, rtol=1e-4)
    # the check can fail: scores without the model's scaling/soft-capping differ clearly
    assert float((got.double() - reference).abs().max()) < 1e-4 < float(reference.max())


@torch.no_grad()
def test_rerotation_equals_the_model_at_shifted_positions(lm):
    """RoPE attention depends on relative positions only, so running the same tokens at
    positions + 100 yields the same pre-RoPE keys rotated 100 further: the model's own keys are
    the reference for every layer's RopeSpec (partial rotary, per-layer rotary bases)."""
    adapter = adapter_for(lm.model)
    ids = _segments(3).context_ids[:64]
    n = int(ids.numel())
    slots = torch.arange(n)
    caches = []
    for offset in (0, 100):
        cache = adapter.new_cache()
        adapter.forward(ids, cache, slots + offset, slots)
        caches.append(cache)
    for layer in range(adapter.n_layers):
        at_0 = adapter.layer_kv(caches[0], layer)[0]
        at_100 = adapter.layer_kv(caches[1], layer)[0]
        moved = rerotate_keys(at_0, slots, slots + 100, adapter.rope(layer))
        torch.testing.assert_close(moved, at_100, atol=2e-4, rtol=1e-4)
        assert float((at_0 - at_100).abs().max()) > 1e-2  # unrotated keys differ clearly


def test_sliding_window_shorter_than_the_run_is_refused_before_model_work():
    lm = tiny_model("mistral", seed=0, sliding_window=64)
    calls = []
    handle = lm.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ConfigError) as info:
            run_segments(lm, load_policy("snapkv:keep_ratio=0.5"), _segments(), max_new_tokens=4)
    finally:
        handle.remove()
    message = str(info.value)
    assert "mistral" in message and "sliding window of 64" in message
    assert "at most 64 tokens" in message  # the fix
    assert calls == []


def test_gemma_sliding_layers_refused_only_past_their_window():
    lm = tiny_model("gemma2", seed=0, sliding_window=200)
    run_segments(lm, load_policy("snapkv:keep_ratio=0.5"), _segments(), max_new_tokens=4)
    short = tiny_model("gemma2", seed=0, sliding_window=100)
    with pytest.raises(ConfigError, match="layer 0 attends through a sliding window of 100"):
        run_segments(short, load_policy("snapkv:keep_ratio=0.5"), _segments(), max_new_tokens=4)


def test_unknown_architecture_is_refused_listing_the_supported_ones():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(
        GPTNeoXConfig(
            hidden_size=64, num_attention_heads=4, intermediate_size=64, num_hidden_layers=1
        )
    )
    with pytest.raises(ConfigError) as info:
        adapter_for(model)
    message = str(info.value)
    assert "'gpt_neox'" in message and "not supported" in message
    for model_type in supported_model_types():
        assert model_type in message


def test_flash_attention_refused_for_block_wise_positions_with_a_jump():
    lm = tiny_model("llama", seed=0)
    adapter = adapter_for(lm.model)
    adapter.config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(ConfigError, match="--attn sdpa"):
            adapter.check_run(total_tokens=200, position_jumps=True, rerotates=False)
        # one-shot and contiguous block-wise layouts feed contiguous positions: allowed
        adapter.check_run(total_tokens=200, position_jumps=False, rerotates=True)
    finally:
        adapter.config._attn_implementation = "sdpa"


def test_every_family_lists_its_model_types():
    assert set(ARCHS) <= set(supported_model_types())


def test_shared_prefill_equals_independent_runs(lm):
    """Several policies' observers on one forward pass: each sees the layer input as the model
    computed it, whatever the others' scorers recompute inside their hooks."""
    from kvpress_lab.engine.shared import run_shared

    seg = _segments(4)
    specs = ["snapkv:keep_ratio=0.3", "h2o:keep_ratio=0.3", "laserkv:keep_ratio=0.3", "full"]
    shared = list(run_shared(lm, [load_policy(s) for s in specs], seg, max_new_tokens=3))
    for spec, got in zip(specs, shared, strict=True):
        alone = run_segments(lm, load_policy(spec), seg, max_new_tokens=3)
        assert torch.equal(got.kept_indices, alone.kept_indices), spec
        assert got.answer_token_ids == alone.answer_token_ids, spec
