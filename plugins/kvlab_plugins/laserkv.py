"""The ``laserkv`` policy: LASER-KV, block-wise accumulative prefill with hybrid selection.

Sood, Sharma, Agrawal, "More Than a Quick Glance: Overcoming the Greedy Bias in KV-Cache
Compression", arXiv 2602.02199 (2026). The context is prefilled in blocks of ``block_size``
tokens at their original positions; after every block the ``accumulative`` budgeter protects the
anchors and the block's local tail, and the ``hybrid`` selector keeps the block's share of the
long-term pool, ``alpha`` of it by exact global attention consensus (``exact`` scorer) and the
rest by SimHash LSH (``lsh`` scorer). Peak KV memory is ``|A| + |T| + S + Q`` tokens rather than
``L``.

Every parameter can be set from a spec string, e.g.
``laserkv:keep_ratio=0.1,block_size=2048,alpha=0.5,lsh_mode=frequency_rank,mode=recursive``.
Ablations: ``alpha=1`` (exact only), ``alpha=0`` (LSH only), ``lookback=false``,
``mode=recursive``. ``keep_ratio=1`` keeps everything and answers exactly like ``full``.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import attrs

from kvlab_plugins.accumulative import AccumulativeBudgeter, Mode, check_divisor
from kvlab_plugins.exact import ExactScorer
from kvlab_plugins.hybrid import HybridSelector, check_alpha
from kvlab_plugins.lsh_scorer import LSHScorer, Vectors, check_bits, check_tables
from kvpress_lab.hookspecs import hookimpl
from kvpress_lab.policy import Composition, EngineOptions, Policy, check_keep_ratio, positive_int

__all__ = ["LaserKVPolicy"]


@attrs.define(kw_only=True)
class LaserKVPolicy(Policy):
    """LASER-KV (arXiv 2602.02199): accumulative block budget + exact/LSH hybrid selection.

    Args:
        keep_ratio: fraction of context tokens kept, in (0, 1] (or give ``budget`` in tokens).
        block_size: S, prefill block length.
        protection_divisor: n > 1; anchors and local window are ``B // n`` tokens each.
        alpha: share of each block's selection made by exact attention, in [0, 1].
        lsh_mode: "magicpig" (collision probability, the paper's choice) or "frequency_rank".
        lsh_vectors: "key" (last-layer keys vs question keys) or "query" (question queries).
        lsh_bits, lsh_tables: SimHash K bits per table and T tables.
        seed: seed of the SimHash projection.
        mode: "accumulate" (append-only cache) or "recursive" (cache rebuilt, bounded at B).
        lookback: re-score the previous block's tail with the next block.
        redistribute: hand LSH slots it cannot fill on merit to exact attention.
    """

    name: ClassVar[str] = "laserkv"
    keep_ratio: float | None = attrs.field(default=0.25, validator=check_keep_ratio)
    budget: int | None = attrs.field(default=None, validator=positive_int)
    block_size: int = attrs.field(default=4096, validator=positive_int)
    protection_divisor: int = attrs.field(default=4, validator=check_divisor)
    alpha: float = attrs.field(default=0.75, validator=check_alpha)
    lsh_mode: Literal["magicpig", "frequency_rank"] = attrs.field(
        default="magicpig", validator=attrs.validators.in_(("magicpig", "frequency_rank"))
    )
    lsh_vectors: Vectors = attrs.field(
        default="key", validator=attrs.validators.in_(("key", "query"))
    )
    lsh_bits: int = attrs.field(default=10, validator=check_bits)
    lsh_tables: int = attrs.field(default=8, validator=check_tables)
    seed: int = 0
    mode: Mode = attrs.field(
        default="accumulate", validator=attrs.validators.in_(("accumulate", "recursive"))
    )
    lookback: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))
    redistribute: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))

    def budgeter(self) -> AccumulativeBudgeter:
        return AccumulativeBudgeter(
            keep_ratio=self.keep_ratio,
            budget=self.budget,
            block_size=self.block_size,
            protection_divisor=self.protection_divisor,
            mode=self.mode,
            lookback=self.lookback,
        )

    def compose(self) -> Composition:
        return Composition(
            budgeter=self.budgeter(),
            scorers={
                "exact": ExactScorer(),
                "lsh": LSHScorer(
                    mode=self.lsh_mode,
                    vectors=self.lsh_vectors,
                    n_bits=self.lsh_bits,
                    n_tables=self.lsh_tables,
                    seed=self.seed,
                ),
            },
            selector=HybridSelector(alpha=self.alpha, redistribute=self.redistribute),
            engine=EngineOptions(block_size=self.block_size, position_mode="original"),
        )


@hookimpl
def kvlab_policies() -> list[type]:
    return [LaserKVPolicy]
