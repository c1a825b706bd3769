"""Parsing and validating the list options of ``kvlab compare``."""

from __future__ import annotations

import re

from kvpress_lab.errors import InputError

__all__ = ["parse_keeps", "parse_lengths", "parse_list", "parse_shard"]

_LENGTH = re.compile(r"^(\d+(?:\.\d+)?)([kK]?)$")


def parse_list(text: str, what: str) -> list[str]:
    """Split ``a,b,c``; empty items are an error."""
    items = [t.strip() for t in str(text).split(",")]
    if not items or any(not t for t in items):
        raise InputError(f"{what} {text!r} has an empty item; give a comma-separated list")
    return items


def parse_lengths(text: str | list[int]) -> list[int]:
    """``"1k,2k,500"`` -> ``[1024, 2048, 500]`` (``k`` = 1024 tokens, as in RULER's 4k, 8k ...)."""
    if isinstance(text, list):
        values = text
    else:
        values = []
        for item in parse_list(text, "--lengths"):
            m = _LENGTH.match(item)
            if m is None:
                raise InputError(
                    f"--lengths: {item!r} is not a length; write token counts like 500, 2048 or "
                    "1k, 2k (k = 1024 tokens)"
                )
            value = float(m.group(1)) * (1024 if m.group(2) else 1)
            if value != int(value):
                raise InputError(f"--lengths: {item!r} is not a whole number of tokens")
            values.append(int(value))
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"--lengths: {v!r} is not a positive number of tokens")
    return list(dict.fromkeys(values))


def parse_keeps(text: str | list[float]) -> list[float]:
    """``"0.5,0.25"`` -> ``[0.5, 0.25]``; every value must be a fraction kept, in (0, 1]."""
    if isinstance(text, list):
        raw: list = text
    else:
        raw = parse_list(text, "--keep")
    values = []
    for item in raw:
        try:
            v = float(item)
        except (TypeError, ValueError):
            raise InputError(
                f"--keep: {item!r} is not a number; give fractions of the context kept in (0, 1], "
                "e.g. 0.5,0.25,0.1"
            ) from None
        if not 0 < v <= 1:
            raise InputError(
                f"--keep: {item!r} is outside (0, 1]; it is the fraction of context tokens kept "
                "(e.g. 0.25 keeps a quarter)"
            )
        values.append(v)
    return list(dict.fromkeys(values))


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` (0-based ``i``) -> ``(i, n)``."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if m is None:
        raise InputError(f"--shard {text!r}: write i/n, e.g. 0/4 for the first of four shards")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= i < n:
        raise InputError(f"--shard {text!r}: need 0 <= i < n")
    return i, n
