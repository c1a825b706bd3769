"""SimHash LSH scorers of LASER-KV, checked against numbers worked out by hand."""

from __future__ import annotations

import pytest
import torch

from kvpress_lab.errors import ConfigError
from kvpress_lab.ops.lsh import (
    LSH_MODES,
    bucket_codes,
    collision_counts,
    lsh_rank_scores,
    magicpig_collision_prob,
    magicpig_scores,
    sign_bits,
    simhash_projection,
)

# Hand-built example: D = 4, K = 2 bits, T = 2 tables, projection R = I_4, so bit j = (x_j > 0);
# table 0 uses bits 0,1 (code = b0 + 2 b1), table 1 uses bits 2,3 (code = b2 + 2 b3).
K, T = 2, 2
R = torch.eye(4)
# The candidates sum to zero, so centring by their mean changes nothing below.
CANDS = torch.tensor(
    [
        [2.0, 3.0, 1.0, -2.0],  # c0 bits 1110 -> codes (3, 1)
        [1.0, 1.0, -1.0, -1.0],  # c1 bits 1100 -> codes (3, 0)
        [1.0, 1.0, 1.0, 1.0],  # c2 bits 1111 -> codes (3, 3)
        [-1.0, -1.0, -1.0, 1.0],  # c3 bits 0001 -> codes (0, 2)
        [-1.0, 1.0, -1.0, -1.0],  # c4 bits 0100 -> codes (2, 0)
        [-2.0, -5.0, 1.0, 2.0],  # c5 bits 0011 -> codes (0, 3)
    ]
)
QUERIES = torch.tensor(
    [
        [1.0, 1.0, 1.0, -1.0],  # q0 bits 1110 -> codes (3, 1)
        [-1.0, 1.0, -1.0, -1.0],  # q1 bits 0100 -> codes (2, 0)
    ]
)
CAND_BITS = [
    [1, 1, 1, 0],
    [1, 1, 0, 0],
    [1, 1, 1, 1],
    [0, 0, 0, 1],
    [0, 1, 0, 0],
    [0, 0, 1, 1],
]
CAND_CODES = [[3, 1], [3, 0], [3, 3], [0, 2], [2, 0], [0, 3]]
QUERY_CODES = [[3, 1], [2, 0]]
# Query buckets: table 0 {3, 2}, table 1 {1, 0}.
# c0: 3 in {3,2}, 1 in {1,0} -> 2;  c1: 3 yes, 0 yes -> 2;  c2: 3 yes, 3 no -> 1;
# c3: 0 no, 2 no -> 0;              c4: 2 yes, 0 yes -> 2;  c5: 0 no, 3 no -> 0.
COUNTS = [2, 2, 1, 0, 2, 0]
# Agreeing bits (of 4) with q0=1110 / q1=0100, max, p = max/4, u = p^4 (K = T = 2, see below):
# c0 4/2 -> p 1.00 u 1;  c1 3/3 -> p .75 u .31640625;  c2 3/1 -> p .75 u .31640625;
# c3 0/2 -> p .50 u .0625;  c4 2/4 -> p 1.00 u 1;  c5 1/1 -> p .25 u .00390625.
MAGICPIG_U = [1.0, 0.31640625, 0.31640625, 0.0625, 1.0, 0.00390625]
POSITIONS = torch.tensor([10, 20, 50, 30, 40, 5])


def _order(scores: torch.Tensor) -> list[int]:
    return torch.argsort(scores, descending=True).tolist()


def test_sign_bits_and_codes_by_hand():
    bits = sign_bits(CANDS, R)
    assert bits.dtype == torch.bool
    assert bits.long().tolist() == CAND_BITS
    assert bucket_codes(bits, K, T).tolist() == CAND_CODES
    assert bucket_codes(sign_bits(QUERIES, R), K, T).tolist() == QUERY_CODES
    # zero is not > 0
    assert sign_bits(torch.tensor([[0.0, -0.0, 1e-30, -1e-30]]), R).tolist() == [
        [False, False, True, False]
    ]


def test_bucket_codes_bit_order():
    # K = 3: table 0 = bits 0..2 = 1,0,1 -> 1 + 4 = 5; table 1 = bits 3..5 = 0,1,1 -> 2 + 4 = 6
    bits = torch.tensor([[1, 0, 1, 0, 1, 1], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    codes = bucket_codes(bits, 3, 2)
    assert codes.dtype == torch.long
    assert codes.tolist() == [[5, 6], [0, 7]]
    with pytest.raises(ValueError, match="n_bits=3 x n_tables=3"):
        bucket_codes(bits, 3, 3)


def test_collision_counts_by_hand():
    counts = collision_counts(torch.tensor(CAND_CODES), torch.tensor(QUERY_CODES))
    assert counts.dtype == torch.long
    assert counts.tolist() == COUNTS
    # a query hitting a bucket twice still counts once per table
    dup = collision_counts(torch.tensor([[1, 1]]), torch.tensor([[1, 0], [1, 1]]))
    assert dup.tolist() == [2]
    assert collision_counts(
        torch.tensor([[1, 1]]), torch.zeros(0, 2, dtype=torch.long)
    ).tolist() == [0]


def test_magicpig_collision_prob_by_hand():
    # p = 0.5, K = 2, T = 2: p^K = 0.25; (1 - 0.25)^2 = 0.5625; 2 * 0.25 * 0.75 = 0.375;
    # u = 1 - 0.5625 - 0.375 = 0.0625 (= p^4: two tables, both must collide).
    u = magicpig_collision_prob(torch.tensor([0.5]), 2, 2)
    assert u.dtype == torch.float32
    assert u.item() == pytest.approx(0.0625, abs=1e-12)
    # p = 0.5, K = 1, T = 3: x = 0.5; 1 - 0.125 - 3 * 0.5 * 0.25 = 0.5
    assert magicpig_collision_prob(torch.tensor([0.5]), 1, 3).item() == pytest.approx(0.5)
    # endpoints: never / always collide; T = 1 can never collide twice
    ends = magicpig_collision_prob(torch.tensor([0.0, 1.0]), 10, 8)
    assert ends.tolist() == [0.0, 1.0]
    assert magicpig_collision_prob(torch.tensor([0.3, 1.0]), 4, 1).tolist() == [0.0, 0.0]
    # float64 stays float64 and is monotone for the defaults K = 10, T = 8, also for small p
    p = torch.linspace(0.3, 1.0, 561, dtype=torch.float64)
    u = magicpig_collision_prob(p, 10, 8)
    assert u.dtype == torch.float64 and bool((u.diff() > 0).all())
    # u ~ C(T, 2) p^(2K) for small p^K
    small = magicpig_collision_prob(torch.tensor([0.2], dtype=torch.float64), 10, 8).item()
    assert small == pytest.approx(28 * 0.2**20, rel=1e-5)


def test_magicpig_scores_by_hand():
    scores = magicpig_scores(sign_bits(CANDS, R), sign_bits(QUERIES, R), K, T)
    assert scores.dtype == torch.float32
    assert scores.tolist() == MAGICPIG_U
    no_query = magicpig_scores(sign_bits(CANDS, R), torch.zeros(0, 4, dtype=torch.bool), K, T)
    assert no_query.tolist() == [0.0] * 6


def test_frequency_rank_order_by_hand():
    # count 2: c1 (dist^2 2), c4 (dist^2 2), c0 (dist^2 10), distances to the mean query
    # m = (q0 + q1) / 2 = [0, 1, 0, -1]: c0-m = [2,2,1,-1] -> 10, c1-m = [1,0,-1,0] -> 2,
    # c4-m = [-1,0,-1,0] -> 2 (tie with c1: lower index first); count 1: c2;
    # count 0: c3 ([-1,-2,-1,2] -> 10), c5 ([-2,-6,1,3] -> 50).
    scores = lsh_rank_scores("frequency_rank", CANDS, QUERIES, POSITIONS, R, K, T)
    assert scores.dtype == torch.float32
    assert _order(scores) == [1, 4, 0, 2, 3, 5]
    # score = N - rank, all distinct
    assert scores.tolist() == [4.0, 6.0, 3.0, 2.0, 5.0, 1.0]


def test_magicpig_order_by_hand():
    # survivors (count >= 2): c0 (u 1, pos 10), c4 (u 1, pos 40), c1 (u .316, pos 20):
    # c4 before c0 (tie on u, more recent), then c1. c2 has the same u as c1 and is more recent
    # (pos 50) but only 1 collision, so it is not a survivor. Fill by recency: c2 (50), c3 (30),
    # c5 (5).
    scores = lsh_rank_scores("magicpig", CANDS, QUERIES, POSITIONS, R, K, T)
    assert _order(scores) == [4, 0, 1, 2, 3, 5]
    assert sorted(scores.tolist()) == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    # top-3 = survivors; top-4 = survivors + the most recent other candidate
    assert set(torch.topk(scores, 3).indices.tolist()) == {0, 1, 4}
    assert set(torch.topk(scores, 4).indices.tolist()) == {0, 1, 2, 4}
    # recency among non-survivors follows positions, not indices
    scores2 = lsh_rank_scores(
        "magicpig", CANDS, QUERIES, torch.tensor([10, 20, 1, 30, 40, 5]), R, K, T
    )
    assert _order(scores2) == [4, 0, 1, 3, 5, 2]


def test_centring_uses_candidate_mean():
    offset = torch.tensor([5.0, -7.0, 3.0, 100.0])
    for mode in LSH_MODES:
        shifted = lsh_rank_scores(mode, CANDS + offset, QUERIES + offset, POSITIONS, R, K, T)
        plain = lsh_rank_scores(mode, CANDS, QUERIES, POSITIONS, R, K, T)
        assert torch.equal(shifted, plain)


def test_half_precision_inputs_match_float32():
    for mode in LSH_MODES:
        half = lsh_rank_scores(mode, CANDS.half(), QUERIES.half(), POSITIONS, R.half(), K, T)
        assert half.dtype == torch.float32
        assert torch.equal(half, lsh_rank_scores(mode, CANDS, QUERIES, POSITIONS, R, K, T))
    assert torch.equal(sign_bits(CANDS.bfloat16(), R), sign_bits(CANDS, R))


def test_projection_seeded_and_independent_of_global_rng():
    state = torch.get_rng_state()
    a = simhash_projection(64, 10, 8, seed=123)
    b = simhash_projection(64, 10, 8, seed=123, device="cpu")
    c = simhash_projection(64, 10, 8, seed=124)
    assert torch.equal(torch.get_rng_state(), state)
    assert a.shape == (64, 80) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    torch.manual_seed(999)  # global RNG state must not matter
    assert torch.equal(simhash_projection(64, 10, 8, seed=123), a)


def test_same_seed_same_selection():
    gen = torch.Generator().manual_seed(0)
    cands = torch.randn(300, 32, generator=gen)
    queries = torch.randn(7, 32, generator=gen) + cands[:7]
    positions = torch.randperm(1000, generator=gen)[:300]
    for mode in LSH_MODES:
        runs = [
            lsh_rank_scores(mode, cands, queries, positions, simhash_projection(32, 6, 4, s), 6, 4)
            for s in (5, 5, 6)
        ]
        assert torch.equal(runs[0], runs[1])
        assert sorted(runs[0].tolist()) == [float(i) for i in range(1, 301)]
        assert not torch.equal(runs[0], runs[2])


def test_validation_errors():
    with pytest.raises(ValueError, match="frequency_rank, magicpig") as info:
        lsh_rank_scores("sampling", CANDS, QUERIES, POSITIONS, R, K, T)
    assert isinstance(info.value, ConfigError)
    with pytest.raises(ValueError, match=r"cand_vecs must be \[N, 4\]"):
        lsh_rank_scores("magicpig", CANDS[:, :3], QUERIES, POSITIONS, R, K, T)
    with pytest.raises(ValueError, match=r"query_vecs must be \[N, 4\]"):
        lsh_rank_scores("magicpig", CANDS, QUERIES[:, :3], POSITIONS, R, K, T)
    with pytest.raises(ValueError, match="n_bits \\* n_tables"):
        lsh_rank_scores("magicpig", CANDS, QUERIES, POSITIONS, R, 2, 3)
    with pytest.raises(ValueError, match="cand_positions"):
        lsh_rank_scores("magicpig", CANDS, QUERIES, POSITIONS[:5], R, K, T)
    with pytest.raises(ValueError, match="at least one query"):
        lsh_rank_scores("frequency_rank", CANDS, QUERIES[:0], POSITIONS, R, K, T)
    with pytest.raises(ValueError, match="n_bits"):
        simhash_projection(4, 0, 2, seed=0)
    empty = lsh_rank_scores("magicpig", CANDS[:0], QUERIES, POSITIONS[:0], R, K, T)
    assert empty.shape == (0,) and empty.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(1)
    cands = torch.randn(500, 64, generator=gen)
    queries = torch.randn(9, 64, generator=gen)
    positions = torch.arange(500)
    proj_cpu = simhash_projection(64, 10, 8, seed=3)
    proj_gpu = simhash_projection(64, 10, 8, seed=3, device="cuda")
    assert proj_gpu.device.type == "cuda" and torch.equal(proj_gpu.cpu(), proj_cpu)
    for mode in LSH_MODES:
        cpu = lsh_rank_scores(mode, cands, queries, positions, proj_cpu, 10, 8)
        gpu = lsh_rank_scores(
            mode, cands.cuda().half(), queries.cuda().half(), positions.cuda(), proj_gpu, 10, 8
        )
        assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
        # half inputs may flip a few near-zero projections; most of the ranking must agree
        top_cpu = set(torch.topk(cpu, 100).indices.tolist())
        top_gpu = set(torch.topk(gpu, 100).indices.cpu().tolist())
        assert len(top_cpu & top_gpu) >= 80
