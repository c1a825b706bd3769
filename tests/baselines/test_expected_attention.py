"""Expected Attention: hand-computed rotation and scores, sinks, keep_ratio=1 equals full."""

from __future__ import annotations

import math

import pytest
import torch
from kvlab_plugins.expected_attention import averaged_rotation, expected_attention_scores
from tiny import tiny_model

from kvpress_lab import run
from kvpress_lab.errors import ConfigError
from kvpress_lab.spec import load_policy

CONTEXT = "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. " * 4
QUESTION = "Which animal jumps?"


def test_averaged_rotation_by_hand():
    # positions with angle 0 and pi/2: R_0 = I, R_1 = [[0, -1], [1, 0]] -> mean [[.5, -.5], [.5, .5]]
    cos = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    sin = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(
        averaged_rotation(cos, sin, 2), torch.tensor([[0.5, -0.5], [0.5, 0.5]])
    )
    # partial rotary: channels past rotary_dim are left alone
    rot = averaged_rotation(cos, sin, 4)
    expected = torch.eye(4)
    expected[:2, :2] = torch.tensor([[0.5, -0.5], [0.5, 0.5]])
    torch.testing.assert_close(rot, expected)


def test_averaged_rotation_is_the_mean_of_rope_rotations():
    # rotate_half RoPE of x at angle a: (x0 cos a - x2 sin a, x1 cos b - x3 sin b, x2 cos a +
    # x0 sin a, x3 cos b + x1 sin b) for head_dim 4, frequencies (a, b)
    angles = torch.tensor([[0.3, 0.05], [1.1, 0.2], [2.0, 0.4]])
    cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)
    x = torch.tensor([1.0, -2.0, 0.5, 3.0])
    ropes = []
    for a, b in angles.tolist():
        ca, sa, cb, sb = math.cos(a), math.sin(a), math.cos(b), math.sin(b)
        ropes.append(
            [
                x[0] * ca - x[2] * sa,
                x[1] * cb - x[3] * sb,
                x[2] * ca + x[0] * sa,
                x[3] * cb + x[1] * sb,
            ]
        )
    expected = torch.tensor(ropes).mean(dim=0)
    torch.testing.assert_close(averaged_rotation(cos, sin, 4) @ x, expected)


def test_expected_attention_scores_by_hand():
    # one KV head, two query heads in its group; head_dim 2, two statistic rows, two keys
    # head 0: queries (1, 0), (3, 0): mu (2, 0), cov [[1, 0], [0, 0]]
    # head 1: queries (0, 1), (0, 1): mu (0, 1), cov 0
    queries = torch.tensor([[[[1.0, 0.0], [3.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]]])
    keys = torch.tensor([[[[1.0, 0.0], [0.0, 2.0]]]])
    s = 0.5
    # head 0 logits: k0: s*2 + s^2*1/2 = 1.125; k1: 0 + 0 = 0
    # head 1 logits: k0: 0; k1: s*2 = 1
    p0 = torch.softmax(torch.tensor([1.125, 0.0]), dim=0)
    p1 = torch.softmax(torch.tensor([0.0, 1.0]), dim=0)
    got = expected_attention_scores(queries, keys, torch.eye(2), s, use_covariance=True)
    torch.testing.assert_close(got, ((p0 + p1) / 2)[None])
    # without covariance head 0's k0 logit is s*2 = 1
    p0 = torch.softmax(torch.tensor([1.0, 0.0]), dim=0)
    got = expected_attention_scores(queries, keys, torch.eye(2), s, use_covariance=False)
    torch.testing.assert_close(got, ((p0 + p1) / 2)[None])
    # a rotation acts on the mean: swapping the axes swaps which key head 0 prefers
    swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    got = expected_attention_scores(queries, keys, swap, s, use_covariance=False)
    # head 0 mu -> (0, 2): logits (0, 2); head 1 mu -> (1, 0): logits (0.5, 0)
    p0 = torch.softmax(torch.tensor([0.0, 2.0]), dim=0)
    p1 = torch.softmax(torch.tensor([0.5, 0.0]), dim=0)
    torch.testing.assert_close(got, ((p0 + p1) / 2)[None])


def test_expected_attention_scores_equal_a_per_query_head_loop():
    # independent reference in float64, one query head at a time: mean and covariance of its
    # rows, rotated (R mu, R S R^T), the expected logit of every key, softmax, mean over the group
    gen = torch.Generator().manual_seed(0)
    n_kv, group, rows, n, d, s = 2, 3, 7, 11, 4, 0.4
    queries = torch.randn(1, n_kv * group, rows, d, generator=gen)
    keys = torch.randn(1, n_kv, n, d, generator=gen)
    rotation = torch.randn(d, d, generator=gen)  # any matrix: catches a transposed product
    for use_covariance in (True, False):
        expected = torch.zeros(n_kv, n, dtype=torch.float64)
        for head in range(n_kv * group):
            q = queries[0, head].double()
            mu = rotation.double() @ q.mean(dim=0)
            centered = q - q.mean(dim=0)
            cov = rotation.double() @ (centered.T @ centered / rows) @ rotation.double().T
            k = keys[0, head // group].double()
            logits = s * (k @ mu)
            if use_covariance:
                logits += s * s / 2 * torch.einsum("ni,ij,nj->n", k, cov, k)
            expected[head // group] += torch.softmax(logits, dim=0) / group
        got = expected_attention_scores(queries, keys, rotation, s, use_covariance)
        torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-7)


def test_policy_record_and_validation():
    policy = load_policy("expected_attention:keep_ratio=0.25")
    assert repr(policy) == (
        "ExpectedAttentionPolicy(keep_ratio=0.25, budget=None, decode_interval=None, "
        "decode_budget=None, n_future_positions=512, "
        "n_sink=4, use_covariance=True, use_vnorm=True, epsilon=0.0)"
    )
    with pytest.raises(ConfigError, match="n_sink=-1 is invalid"):
        load_policy("expected_attention:n_sink=-1")
    with pytest.raises(ConfigError, match="n_future_positions=0 is invalid"):
        load_policy("expected_attention:n_future_positions=0")


@pytest.mark.parametrize("query_agnostic", [False, True])
def test_keep_ratio_one_answers_like_full(query_agnostic):
    lm = tiny_model("qwen2", seed=2)
    full = run(lm, "full", CONTEXT, QUESTION, max_new_tokens=10, query_agnostic=query_agnostic)
    other = run(
        lm,
        "expected_attention:keep_ratio=1",
        CONTEXT,
        QUESTION,
        max_new_tokens=10,
        query_agnostic=query_agnostic,
    )
    assert other.answer_token_ids == full.answer_token_ids
    assert other.kept_tokens == full.kept_tokens


@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma2"])
def test_compressed_run_keeps_the_budget_and_the_sinks(arch):
    from kvpress_lab import build_prompt, prefill_and_compress

    lm = tiny_model(arch)
    segments = build_prompt(lm.tokenizer, CONTEXT, QUESTION)
    state = prefill_and_compress(lm, load_policy("expected_attention:keep_ratio=0.3"), segments)
    idx = state.context_index
    assert idx.shape[-1] == int(0.3 * segments.context_length)
    assert bool((idx[..., :4] == torch.arange(4)).all())
