"""SimHash locality-sensitive hashing for the LASER-KV LSH scorers (pure tensor functions).

LASER-KV (Sood, Sharma, Agrawal, arXiv 2602.02199) ranks candidate tokens by how often their
(centred) key vectors fall into the same SimHash buckets as the question's vectors. A seeded
Gaussian matrix R [D, K*T] hashes a vector x to K*T sign bits ``x R > 0``, read as T codes of K bits
(table t uses bits t*K .. t*K+K-1, ``code_t = sum_i bit_i 2^i``).

Two ranking modes (see ``docs`` / spec section 4):

- ``frequency_rank``: collision count (tables hit by any query) descending, then L2 distance to
  the mean query vector ascending, then candidate index.
- ``magicpig``: the reference's "magicpig_baseline". Candidates colliding in >= 2 tables rank
  first, by the MagicPIG collision probability u(p) (Chen et al. 2024, "MagicPIG: LSH Sampling for
  Efficient LLM Generation") maximised over query vectors; the rest follow by recency. This is a
  deterministic top-k, not MagicPIG's sampling with importance weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvpress_lab.errors import ConfigError

__all__ = [
    "LSH_MODES",
    "bucket_codes",
    "collision_counts",
    "lsh_rank",
    "lsh_rank_scores",
    "magicpig_collision_prob",
    "magicpig_scores",
    "sign_bits",
    "simhash_projection",
]

LSH_MODES = ("frequency_rank", "magicpig")


def _check_sizes(n_bits: int, n_tables: int) -> None:
    if not 1 <= n_bits <= 62:
        raise ValueError(f"n_bits must be in 1..62 (codes are int64), got {n_bits}")
    if n_tables < 1:
        raise ValueError(f"n_tables must be >= 1, got {n_tables}")


def simhash_projection(
    dim: int, n_bits: int, n_tables: int, seed: int, device: torch.device | str | None = None
) -> Tensor:
    """Random hyperplanes R ``[dim, n_bits * n_tables]`` (float32, standard normal).

    Drawn once on the CPU from ``torch.Generator().manual_seed(seed)`` (independent of the global
    RNG and of the device), then moved to ``device``: the same seed gives the same matrix everywhere.
    """
    _check_sizes(n_bits, n_tables)
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    proj = torch.randn(dim, n_bits * n_tables, generator=gen, dtype=torch.float32)
    return proj.to(device) if device is not None else proj


def _check_vectors(name: str, x: Tensor, projection: Tensor) -> None:
    if projection.dim() != 2:
        raise ValueError(f"projection must be [dim, n_bits*n_tables], got {list(projection.shape)}")
    if x.dim() != 2 or x.shape[1] != projection.shape[0]:
        raise ValueError(
            f"{name} must be [N, {projection.shape[0]}] to match the projection "
            f"{list(projection.shape)}, got {list(x.shape)}"
        )


def sign_bits(x: Tensor, projection: Tensor) -> Tensor:
    """SimHash bits: bool ``[N, K*T]`` = ``(x @ R) > 0``, computed in float32 on ``x``'s device."""
    _check_vectors("x", x, projection)
    proj = projection.to(device=x.device, dtype=torch.float32)
    return (x.to(torch.float32) @ proj) > 0


def bucket_codes(bits: Tensor, n_bits: int, n_tables: int) -> Tensor:
    """Bucket ids: long ``[N, T]``, ``code_t = sum_i bits[:, t*K + i] * 2^i``."""
    _check_sizes(n_bits, n_tables)
    if bits.dim() != 2 or bits.shape[1] != n_bits * n_tables:
        raise ValueError(
            f"bits must be [N, {n_bits * n_tables}] (n_bits={n_bits} x n_tables={n_tables}), "
            f"got {list(bits.shape)}"
        )
    weights = torch.pow(2, torch.arange(n_bits, device=bits.device, dtype=torch.long))
    return (bits.reshape(-1, n_tables, n_bits).long() * weights).sum(dim=-1)


def collision_counts(cand_codes: Tensor, query_codes: Tensor) -> Tensor:
    """Per candidate, the number of tables (0..T) where its bucket holds at least one query."""
    if (
        cand_codes.dim() != 2
        or query_codes.dim() != 2
        or cand_codes.shape[1] != query_codes.shape[1]
    ):
        raise ValueError(
            "cand_codes and query_codes must be [N, T] and [Q, T] with the same T, got "
            f"{list(cand_codes.shape)} and {list(query_codes.shape)}"
        )
    counts = torch.zeros(cand_codes.shape[0], dtype=torch.long, device=cand_codes.device)
    query_codes = query_codes.to(cand_codes.device)
    for t in range(cand_codes.shape[1]):
        counts += torch.isin(cand_codes[:, t], query_codes[:, t])
    return counts


def magicpig_collision_prob(p: Tensor, n_bits: int, n_tables: int) -> Tensor:
    """MagicPIG's u(p) = 1 - (1 - p^K)^T - T p^K (1 - p^K)^(T-1) (Chen et al. 2024).

    The probability that two vectors whose bits agree with probability p collide in at least two
    of T tables of K bits. Evaluated in float64 (the two subtractions cancel for small p^K) and
    returned in ``p``'s floating dtype (float32 for integer input), clamped to [0, 1] against
    rounding.
    """
    _check_sizes(n_bits, n_tables)
    out_dtype = p.dtype if p.is_floating_point() else torch.float32
    x = p.to(torch.float64) ** n_bits
    u = 1 - (1 - x) ** n_tables - n_tables * x * (1 - x) ** (n_tables - 1)
    return u.clamp(0.0, 1.0).to(out_dtype)


def _max_agreements(cand_bits: Tensor, query_bits: Tensor) -> Tensor:
    """Per candidate, the most bits (of K*T) on which it agrees with any query: long [N]."""
    if cand_bits.dim() != 2 or query_bits.dim() != 2 or cand_bits.shape[1] != query_bits.shape[1]:
        raise ValueError(
            "cand_bits and query_bits must be [N, K*T] and [Q, K*T] with the same width, got "
            f"{list(cand_bits.shape)} and {list(query_bits.shape)}"
        )
    if query_bits.shape[0] == 0:
        return torch.zeros(cand_bits.shape[0], dtype=torch.long, device=cand_bits.device)
    c = cand_bits.to(torch.float32)
    q = query_bits.to(device=c.device, dtype=torch.float32)
    # agreements = both set + both clear; small integers, exact in float32
    agree = c @ q.T + (1 - c) @ (1 - q).T
    return agree.amax(dim=1).round().long()


def magicpig_scores(cand_bits: Tensor, query_bits: Tensor, n_bits: int, n_tables: int) -> Tensor:
    """Float32 ``[N]``: max over query vectors of u(p), p = agreeing bits / (K*T) (0 if no query)."""
    _check_sizes(n_bits, n_tables)
    if cand_bits.shape[-1] != n_bits * n_tables:
        raise ValueError(
            f"bits must have {n_bits * n_tables} columns (n_bits x n_tables), got {cand_bits.shape[-1]}"
        )
    p = _max_agreements(cand_bits, query_bits).to(torch.float64) / (n_bits * n_tables)
    return magicpig_collision_prob(p, n_bits, n_tables).to(torch.float32)


def _lexsort(keys: list[Tensor]) -> Tensor:
    """Indices ordering rows by ``keys`` ascending, the first key most significant."""
    order = torch.arange(keys[0].shape[0], device=keys[0].device)
    for key in reversed(keys):
        order = order[torch.sort(key[order], stable=True).indices]
    return order


def lsh_rank_scores(
    mode: str,
    cand_vecs: Tensor,
    query_vecs: Tensor,
    cand_positions: Tensor,
    projection: Tensor,
    n_bits: int,
    n_tables: int,
) -> Tensor:
    """Distinct float32 scores ``[N]`` (``N - rank``, rank 0 best) giving the spec's LSH order.

    The first output of :func:`lsh_rank`, which documents the order and the arguments.
    """
    return lsh_rank(mode, cand_vecs, query_vecs, cand_positions, projection, n_bits, n_tables)[0]


def lsh_rank(
    mode: str,
    cand_vecs: Tensor,
    query_vecs: Tensor,
    cand_positions: Tensor,
    projection: Tensor,
    n_bits: int,
    n_tables: int,
) -> tuple[Tensor, Tensor]:
    """Rank scores and collision counts: (float32 ``[N]``, long ``[N]``), each vector hashed once.

    The scores are distinct, ``N - rank`` with rank 0 best, giving the spec's LSH order; the
    counts are the tables (0..T) in which each candidate collides with a query vector.

    Both vector sets are centred by the candidates' mean, then hashed with ``projection``.

    - ``"frequency_rank"``: collision count descending, L2 distance to the mean centred query
      ascending, candidate index ascending.
    - ``"magicpig"``: candidates with count >= 2 first, by max-over-queries u(p) descending (ties:
      larger ``cand_positions`` first, then index); then all others by position descending, then
      index. Taking the top ``budget`` keeps the best survivors and fills with the most recent
      other candidates. u(p) is strictly increasing in p for T >= 2, so survivors are ordered by
      their integer bit-agreement count, which is exactly the u(p) order without float rounding.

    Args:
        cand_vecs: ``[N, D]`` candidate vectors; query_vecs: ``[Q, D]`` (Q >= 1).
        cand_positions: ``[N]`` integer positions (recency) of the candidates.
        projection: ``[D, n_bits * n_tables]`` from :func:`simhash_projection`.
    """
    if mode not in LSH_MODES:
        raise ConfigError(f"unknown LSH mode {mode!r}; allowed modes: {', '.join(LSH_MODES)}")
    _check_sizes(n_bits, n_tables)
    _check_vectors("cand_vecs", cand_vecs, projection)
    _check_vectors("query_vecs", query_vecs, projection)
    if projection.shape[1] != n_bits * n_tables:
        raise ValueError(
            f"projection has {projection.shape[1]} columns but n_bits * n_tables = "
            f"{n_bits} * {n_tables} = {n_bits * n_tables}"
        )
    n = cand_vecs.shape[0]
    if cand_positions.shape != (n,):
        raise ValueError(f"cand_positions must be [{n}], got {list(cand_positions.shape)}")
    if query_vecs.shape[0] == 0:
        raise ValueError("query_vecs is empty: LSH scoring needs at least one query vector")
    device = cand_vecs.device
    if n == 0:
        empty = torch.zeros(0, dtype=torch.float32, device=device)
        return empty, torch.zeros(0, dtype=torch.long, device=device)

    cand = cand_vecs.to(torch.float32)
    query = query_vecs.to(device=device, dtype=torch.float32)
    mean = cand.mean(dim=0)
    cand = cand - mean
    query = query - mean
    cand_bits = sign_bits(cand, projection)
    query_bits = sign_bits(query, projection)
    counts = collision_counts(
        bucket_codes(cand_bits, n_bits, n_tables), bucket_codes(query_bits, n_bits, n_tables)
    )
    index = torch.arange(n, device=device)

    if mode == "frequency_rank":
        dist = (cand - query.mean(dim=0)).norm(dim=1)
        order = _lexsort([-counts, dist, index])
    else:  # magicpig
        positions = cand_positions.to(device=device, dtype=torch.long)
        survivor = counts >= 2
        agree = torch.where(survivor, _max_agreements(cand_bits, query_bits), 0)
        order = _lexsort([(~survivor).long(), -agree, -positions, index])

    rank = torch.empty(n, dtype=torch.long, device=device)
    rank[order] = index
    return (n - rank).to(torch.float32), counts
