"""The ``lsh`` scorer: LASER-KV's SimHash ranking of candidates against the question.

LASER-KV (Sood, Sharma, Agrawal, arXiv 2602.02199) complements attention scores with a
locality-sensitive hash that finds keys similar to the question regardless of how much attention
they got in one pass. A SimHash projection ``R [D, K*T]`` is drawn once per scorer instance from
``seed`` (see :mod:`kvpress_lab.ops.lsh`); the same seed always gives the same selection.

Vectors (``vectors``):

- ``"key"`` (the reference behaviour): post-RoPE keys of the LAST layer averaged over KV heads,
  for the candidates and for the question tokens, both centred by the candidates' mean.
- ``"query"`` (MagicPIG-style query-to-key): the question's queries of the last layer, averaged
  over query heads, hashed against the candidates' keys. Keys are centred by the candidates' mean
  and the queries are left as they are (centring a query only shifts every q.k by a constant).

Ranking (``mode``): ``"frequency_rank"`` (tables hit, then distance to the mean question vector)
or ``"magicpig"`` (collision probability u(p) among candidates hit in >= 2 tables, then the most
recent others). This is a deterministic top-k, not MagicPIG's sampling with importance weights
(Chen et al. 2024, "MagicPIG: LSH Sampling for Efficient LLM Generation").

Scores are distinct and follow the rank order. Candidates the hash actually matched (magicpig:
hit in >= 2 tables; frequency_rank: hit in >= 1 table) get positive scores, the fill that only
ranks by recency or distance gets negative scores, non-candidates ``-inf``; the hybrid selector's
``redistribute`` option reads that sign. Scores are computed only over the candidates passed in,
so the centring follows them (the hybrid selector passes the ones the exact scorer left).
When the question is not visible the block's trailing observation window stands in for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar, Literal

import attrs
import torch

from kvpress_lab.errors import ConfigError
from kvpress_lab.hookspecs import hookimpl
from kvpress_lab.interfaces import LayerObservation, Scorer, StepLayout
from kvpress_lab.ops.lsh import LSH_MODES, lsh_rank, simhash_projection
from kvpress_lab.validators import positive_int

__all__ = ["LSHScorer", "check_bits"]

Vectors = Literal["key", "query"]
Mode = Literal["magicpig", "frequency_rank"]


def check_bits(instance, attribute, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 62:
        raise ConfigError(f"{attribute.name}={value!r} is invalid: it must be an integer in 1..62")


@attrs.define(kw_only=True)
class LSHScorer(Scorer):
    """SimHash ranking of candidates against the question (see module docstring)."""

    name: ClassVar[str] = "lsh"
    mode: Mode = attrs.field(default="magicpig", validator=attrs.validators.in_(LSH_MODES))
    vectors: Vectors = attrs.field(default="key", validator=attrs.validators.in_(("key", "query")))
    n_bits: int = attrs.field(default=10, validator=check_bits)
    n_tables: int = attrs.field(default=8, validator=positive_int)
    seed: int = 0
    _projection: torch.Tensor | None = attrs.field(default=None, init=False, repr=False, eq=False)

    def projection(self, dim: int, device: torch.device) -> torch.Tensor:
        """R [dim, K*T], drawn from ``seed`` on first use and reused for the instance's life."""
        if self._projection is None or self._projection.shape[0] != dim:
            self._projection = simhash_projection(dim, self.n_bits, self.n_tables, self.seed)
        if self._projection.device != device:
            self._projection = self._projection.to(device)
        return self._projection

    def observe(self, obs: LayerObservation) -> torch.Tensor | None:
        """On the last layer only: the question side's vectors [r, D] (float32)."""
        if obs.layer_idx != obs.n_layers - 1:
            return None
        rows = obs.observation_rows()
        if self.vectors == "query":
            return obs.queries(rows)[0].float().mean(dim=0)  # [H_q, r, D] -> [r, D]
        slots = slice(obs.n_past + rows.start, obs.n_past + rows.stop)
        return obs.keys[0, :, slots].float().mean(dim=0)  # [H_kv, r, D] -> [r, D]

    def score(
        self,
        layout: StepLayout,
        observed: Sequence[torch.Tensor | None],
        candidates: torch.Tensor,
        cache_keys: Callable[[int], torch.Tensor],
    ) -> torch.Tensor:
        n_layers = len(observed)
        query = observed[-1]
        if query is None or query.shape[0] == 0:
            raise RuntimeError(
                "lsh scorer: the last layer was not observed during the forward pass"
            )
        keys = cache_keys(n_layers - 1)[0].float().mean(dim=0)  # [N, D] post-RoPE, KV-head mean
        device = keys.device
        cand = candidates.to(device=device, dtype=torch.bool)
        # one host read each, once per step: the check and the candidates' count (nonzero)
        if not bool((cand == cand[:1, :1]).all()):
            raise ConfigError("lsh scorer needs the same candidates in every layer and KV head")
        cand_slots = torch.nonzero(cand[0, 0]).flatten()
        out = torch.full((1, 1, layout.n_slots), float("-inf"), device=device)
        if cand_slots.numel() == 0:
            return out
        cand_vecs = keys.index_select(0, cand_slots)
        query = query.to(device)
        if self.vectors == "query":
            # lsh_rank_scores centres both sides by the candidates' mean; pre-adding it leaves
            # the queries uncentred (MagicPIG centres keys only)
            query = query + cand_vecs.mean(dim=0)
        positions = layout.context_index[0, 0].to(device).index_select(0, cand_slots)
        proj = self.projection(keys.shape[-1], device)
        # every vector is hashed once: the ranking also returns the collision counts
        rank, counts = lsh_rank(
            self.mode, cand_vecs, query, positions, proj, self.n_bits, self.n_tables
        )
        # candidates the hash ranks on merit rather than by the fill order
        matched = counts >= (2 if self.mode == "magicpig" else 1)
        out[0, 0, cand_slots] = torch.where(matched, rank, rank - (cand_slots.numel() + 1))
        return out


@hookimpl
def kvlab_scorers() -> list[type]:
    return [LSHScorer]
