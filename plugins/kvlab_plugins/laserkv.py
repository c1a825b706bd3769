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

from typing import ClassVar

import attrs

from kvlab_plugins.accumulative import AccumulativeBudgeter
from kvlab_plugins.exact import ExactScorer
from kvlab_plugins.hybrid import HybridSelector
from kvlab_plugins.lsh_scorer import LSHScorer
from kvpress_lab.hookspecs import hookimpl
from kvpress_lab.params import Expose, policy_with
from kvpress_lab.policy import Composition, EngineOptions

__all__ = ["LaserKVPolicy"]

# the LSH scorer's fields carry an ``lsh_`` prefix (its ``mode`` would collide with the
# budgeter's); ``seed`` keeps its name
_LSH_NAMES = {
    "mode": "lsh_mode",
    "vectors": "lsh_vectors",
    "n_bits": "lsh_bits",
    "n_tables": "lsh_tables",
}


@attrs.define(kw_only=True)
class LaserKVPolicy(
    policy_with(
        AccumulativeBudgeter,
        Expose(HybridSelector, only=("alpha", "redistribute")),
        Expose(LSHScorer, rename=_LSH_NAMES),
        defaults={"keep_ratio": 0.25},
    )
):
    """LASER-KV (arXiv 2602.02199): accumulative block budget + exact/LSH hybrid selection.

    Parameters, declared by the plugins: the ``accumulative`` budgeter's ``block_size`` (S),
    ``protection_divisor`` (n), ``mode`` and ``lookback``; the ``hybrid`` selector's ``alpha`` and
    ``redistribute``; the ``lsh`` scorer's ``mode``, ``vectors``, ``n_bits``, ``n_tables`` as
    ``lsh_mode``, ``lsh_vectors``, ``lsh_bits``, ``lsh_tables``, and its ``seed``.
    """

    name: ClassVar[str] = "laserkv"

    def budgeter(self) -> AccumulativeBudgeter:
        return self.build(AccumulativeBudgeter)

    def compose(self) -> Composition:
        return Composition(
            budgeter=self.budgeter(),
            scorers={"exact": ExactScorer(), "lsh": self.build(LSHScorer)},
            selector=self.build(HybridSelector),
            engine=EngineOptions(block_size=self.block_size, position_mode="original"),
        )


@hookimpl
def kvlab_policies() -> list[type]:
    return [LaserKVPolicy]
