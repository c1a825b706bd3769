"""Side-by-side comparisons of KV-cache policies on long-context tasks (``kvlab compare``).

>>> from kvpress_lab.compare import compare                            # doctest: +SKIP
>>> compare(["snapkv", "laserkv"], tasks=["niah"], lengths="1k,2k", keeps=[0.25], out="res")

Names load on first use, so the CLI's parser can read the defaults without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DEFAULTS": "kvpress_lab.compare.defaults",
    "CompareResult": "kvpress_lab.compare.runner",
    "compare": "kvpress_lab.compare.runner",
    "plan_policies": "kvpress_lab.compare.runner",
    "parse_keeps": "kvpress_lab.compare.parse",
    "parse_lengths": "kvpress_lab.compare.parse",
    "parse_shard": "kvpress_lab.compare.parse",
}

__all__ = [
    "CompareResult",
    "DEFAULTS",
    "compare",
    "parse_keeps",
    "parse_lengths",
    "parse_shard",
    "plan_policies",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvpress_lab.compare' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from kvpress_lab.compare.defaults import DEFAULTS
    from kvpress_lab.compare.parse import parse_keeps, parse_lengths, parse_shard
    from kvpress_lab.compare.runner import CompareResult, compare, plan_policies
