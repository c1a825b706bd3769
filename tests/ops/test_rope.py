"""Key re-rotation against each model's own RoPE, on tiny random models built from configs."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.qwen2 import modeling_qwen2
from transformers.models.qwen3 import modeling_qwen3

from kvpress_lab.errors import ConfigError
from kvpress_lab.ops.rope import apply_rope, rerotate_keys, rotate_half

HEAD_DIM = 16
KV_HEADS = 2
TOL = 1e-5

TINY = dict(
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=KV_HEADS,
    vocab_size=64,
    max_position_embeddings=256,
)

ROPE_PARAMETERS = {
    "default": None,
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    # yarn's attention_scaling (mscale) is 0.1 * ln(4) + 1 = 1.139: a double scaling would show.
    "yarn": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "longrope": {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 64,
        "short_factor": [1.0 + 0.1 * i for i in range(HEAD_DIM // 2)],
        "long_factor": [1.0 + i for i in range(HEAD_DIM // 2)],
    },
}

ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM, modeling_llama),
    "mistral": (MistralConfig, MistralForCausalLM, modeling_mistral),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, modeling_qwen2),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, modeling_qwen3),
}


def _tiny_model(arch: str, rope: str = "default"):
    config_cls, model_cls, module = ARCHS[arch]
    params = ROPE_PARAMETERS[rope]
    kwargs = {} if params is None else {"rope_parameters": dict(params)}
    config = config_cls(**TINY, head_dim=HEAD_DIM, **kwargs)
    torch.manual_seed(0)
    return model_cls(config).eval(), module


def _model_rope(module, rotary_emb, pre_keys: torch.Tensor, positions: torch.Tensor):
    """The model's own RoPE from scratch: positions [n] or [kv_heads, n]."""
    batch = pre_keys.shape[0]
    if positions.dim() == 1:
        cos, sin = rotary_emb(pre_keys, positions[None].expand(batch, -1))
        return module.apply_rotary_pos_emb(pre_keys, pre_keys, cos, sin)[1]
    heads = [
        _model_rope(module, rotary_emb, pre_keys[:, h : h + 1], positions[h])
        for h in range(positions.shape[0])
    ]
    return torch.cat(heads, dim=1)


def _pre_keys(n: int, seed: int = 1, batch: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, KV_HEADS, n, HEAD_DIM, generator=gen)


def _random_positions(n: int, high: int, seed: int, heads: int | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if heads is None:
        return torch.randperm(high, generator=gen)[:n].sort().values
    return torch.stack([_random_positions(n, high, seed + 1 + h) for h in range(heads)])


def _check_move(arch, rope, old, new, n):
    model, module = _tiny_model(arch, rope)
    rot = model.model.rotary_emb
    pre = _pre_keys(n)
    keys_old = _model_rope(module, rot, pre, old)
    moved = rerotate_keys(keys_old, old, new, rot)
    expected = _model_rope(module, rot, pre, new)
    assert moved.dtype == keys_old.dtype and moved.shape == keys_old.shape
    assert (moved - expected).abs().max().item() <= TOL
    # a pure rotation: norms unchanged (no second attention_scaling)
    torch.testing.assert_close(moved.norm(dim=-1), keys_old.norm(dim=-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_rerotate_matches_model_rope_per_architecture(arch):
    n = 24
    old = _random_positions(n, 3000, seed=2)
    _check_move(arch, "default", old, torch.arange(n), n)  # compact to 0..n-1 (left)
    _check_move(arch, "default", old, old + 517, n)  # move right


@pytest.mark.parametrize("rope", ["default", "linear", "llama3", "yarn"])
def test_rerotate_matches_model_rope_per_rope_type(rope):
    n = 24
    old = _random_positions(n, 3000, seed=3)
    new = _random_positions(n, 3000, seed=4)  # arbitrary, mixed-sign deltas
    _check_move("llama", rope, old, new, n)
    _check_move("llama", rope, old, torch.arange(n), n)


def test_rerotate_longrope_within_one_frequency_set():
    # longrope uses short factors while max position < original_max_position_embeddings (64)
    # and long factors beyond; re-rotation is exact inside one regime.
    n = 16
    _check_move("llama", "longrope", _random_positions(n, 64, seed=5), torch.arange(n), n)
    model, module = _tiny_model("llama", "longrope")
    rot = model.model.rotary_emb
    pre = _pre_keys(n)
    old = 100 + _random_positions(n, 150, seed=6)
    new = 64 + torch.arange(n)
    new[-1] = 200  # keep the long regime for the from-scratch reference
    keys_old = _model_rope(module, rot, pre, old)  # switches the module to the long set
    moved = rerotate_keys(keys_old, old, new, rot)
    expected = _model_rope(module, rot, pre, new)
    assert (moved - expected).abs().max().item() <= TOL


def test_rerotate_far_positions_stay_exact():
    # 100k-range positions: angles are formed as transformers forms them, difference in float64
    n = 8
    old = 100_000 + _random_positions(n, 20_000, seed=7)
    _check_move("llama", "default", old, torch.arange(n), n)
    _check_move("qwen2", "default", old, old - 50_000, n)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_rerotate_per_head_positions(arch):
    n = 20
    old = _random_positions(n, 2000, seed=8, heads=KV_HEADS)
    assert not torch.equal(old[0], old[1])
    _check_move(arch, "default", old, torch.arange(n), n)  # per-head old, shared new
    new = _random_positions(n, 2000, seed=20, heads=KV_HEADS)
    _check_move(arch, "yarn" if arch == "llama" else "default", old, new, n)


def test_rerotate_identity_when_positions_equal():
    model, module = _tiny_model("llama", "yarn")
    rot = model.model.rotary_emb
    pos = _random_positions(12, 500, seed=9)
    keys = _model_rope(module, rot, _pre_keys(12), pos)
    assert torch.equal(rerotate_keys(keys, pos, pos, rot), keys)
    per_head = pos[None].repeat(KV_HEADS, 1)
    assert torch.equal(rerotate_keys(keys, per_head, pos, rot), keys)
    bf16 = keys.to(torch.bfloat16)
    out = rerotate_keys(bf16, pos, pos, rot)
    assert out.dtype == torch.bfloat16 and torch.equal(out, bf16)


def test_rerotate_half_precision_returns_input_dtype():
    model, module = _tiny_model("mistral")
    rot = model.model.rotary_emb
    n = 10
    old = _random_positions(n, 400, seed=10)
    pre = _pre_keys(n)
    keys = _model_rope(module, rot, pre, old).to(torch.float16)
    moved = rerotate_keys(keys, old, torch.arange(n), rot)
    assert moved.dtype == torch.float16
    expected = _model_rope(module, rot, pre, torch.arange(n))
    assert (moved.float() - expected).abs().max().item() < 1e-2


def test_rerotate_rejects_dynamic_rope():
    config = LlamaConfig(
        **TINY,
        head_dim=HEAD_DIM,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0},
    )
    rot = modeling_llama.LlamaRotaryEmbedding(config)
    keys = _pre_keys(4)
    with pytest.raises(ValueError, match="dynamic") as info:
        rerotate_keys(keys, torch.arange(4), torch.arange(4), rot)
    assert isinstance(info.value, ConfigError)


def test_rerotate_partial_rotary_equals_model_rope_from_scratch():
    """GPT-NeoX rotates only the first rotary_dim channels (partial_rotary_factor < 1); its own
    RoPE applied at the new positions is the reference."""
    from transformers.models.gpt_neox import modeling_gpt_neox

    config = GPTNeoXConfig(
        hidden_size=64, num_attention_heads=4, intermediate_size=64, num_hidden_layers=1
    )
    assert config.rope_parameters["partial_rotary_factor"] < 1
    rot = GPTNeoXForCausalLM(config).gpt_neox.rotary_emb
    assert 2 * rot.inv_freq.numel() < 16  # partial: fewer rotary channels than head_dim
    pre = torch.randn(1, 4, 5, 16, generator=torch.Generator().manual_seed(3))
    old, new = torch.tensor([7, 30, 31, 90, 200]), torch.arange(5)
    at_old = _model_rope(modeling_gpt_neox, rot, pre, old)
    expected = _model_rope(modeling_gpt_neox, rot, pre, new)
    got = rerotate_keys(at_old, old, new, rot)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # the pass-through channels are untouched, and the check can fail: unrotated keys differ
    assert torch.equal(got[..., 2 * rot.inv_freq.numel() :], pre[..., 2 * rot.inv_freq.numel() :])
    assert float((at_old - expected).abs().max()) > 1e-2


def test_rerotate_validates_shapes():
    model, _ = _tiny_model("llama")
    rot = model.model.rotary_emb
    keys = _pre_keys(6)
    with pytest.raises(ValueError, match="new_positions"):
        rerotate_keys(keys, torch.arange(6), torch.arange(5), rot)
    with pytest.raises(ValueError, match="old_positions"):
        rerotate_keys(keys, torch.arange(6).repeat(3, 1), torch.arange(6), rot)
    with pytest.raises(ValueError, match="integer"):
        rerotate_keys(keys, torch.arange(6).float(), torch.arange(6), rot)
    with pytest.raises(ValueError, match="keys must be"):
        rerotate_keys(keys[0], torch.arange(6), torch.arange(6), rot)
    with pytest.raises(ValueError, match="inv_freq"):
        rerotate_keys(keys, torch.arange(6), torch.arange(6), torch.nn.Identity())


def test_rotate_half_and_apply_rope_match_transformers():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 5, 8, generator=gen)
    cos = torch.randn(2, 1, 5, 8, generator=gen)
    sin = torch.randn(2, 1, 5, 8, generator=gen)
    assert torch.equal(rotate_half(x), modeling_llama.rotate_half(x))
    expected = modeling_llama.apply_rotary_pos_emb(x, x, cos[:, 0], sin[:, 0])[1]
    assert torch.equal(apply_rope(x, cos, sin), expected)
