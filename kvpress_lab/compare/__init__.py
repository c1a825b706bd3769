"""Side-by-side comparisons of KV-cache policies on long-context tasks (``kvlab compare``).

>>> from kvpress_lab.compare import compare                            # doctest: +SKIP
>>> compare(["snapkv", "laserkv"], tasks=["niah"], lengths="1k,2k", keeps=[0.25], out="res")
"""

from kvpress_lab.compare.parse import parse_keeps, parse_lengths, parse_shard
from kvpress_lab.compare.runner import DEFAULTS, CompareResult, compare, plan_policies

__all__ = [
    "DEFAULTS",
    "CompareResult",
    "compare",
    "parse_keeps",
    "parse_lengths",
    "parse_shard",
    "plan_policies",
]
