"""The shared attrs validators of policies and plugins.

Every validator raises :class:`kvpress_lab.errors.ConfigError` with a message that names the
parameter, the value it got and what is allowed, e.g. ``alpha=1.2 is invalid: it must be a number
in [0, 1], ...``. The plain ones (:func:`check_keep_ratio`, :func:`positive_int`,
:func:`non_negative_int`) are used as they are; the factories (:func:`unit_interval`,
:func:`int_at_least`) take the sentence that explains the parameter, so the message stays
specific while the check itself is written once.

A policy that exposes a plugin's fields (:func:`kvpress_lab.params.policy_with`) reuses the
plugin's validator objects, so a plugin and its policy reject a bad value with the same function
and the same message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from kvpress_lab.errors import ConfigError

__all__ = [
    "Validator",
    "check_keep_ratio",
    "int_at_least",
    "non_negative_int",
    "odd_kernel",
    "positive_int",
    "unit_interval",
]

Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_keep_ratio(instance: Any, attribute: attrs.Attribute, value: float | None) -> None:
    """attrs validator: keep_ratio must lie in (0, 1] (None: not set)."""
    if value is None:
        return
    if not _is_number(value) or not 0 < value <= 1:
        raise ConfigError(
            f"{attribute.name}={value!r} is invalid: it must be a number in (0, 1], "
            "the fraction of context tokens kept (e.g. keep_ratio=0.25)"
        )


def positive_int(instance: Any, attribute: attrs.Attribute, value: int | None) -> None:
    """attrs validator: an integer >= 1 (None allowed where the field is optional)."""
    if value is None:
        return
    if not _is_int(value) or value < 1:
        raise ConfigError(f"{attribute.name}={value!r} is invalid: it must be an integer >= 1")


def non_negative_int(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    """attrs validator: an integer >= 0."""
    if not _is_int(value) or value < 0:
        raise ConfigError(f"{attribute.name}={value!r} is invalid: it must be an integer >= 0")


def odd_kernel(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    """attrs validator: a pooling kernel, an odd integer >= 1 (SnapKV-style score smoothing)."""
    positive_int(instance, attribute, value)
    if value % 2 == 0:
        raise ConfigError(
            f"{attribute.name}={value!r} is invalid: the pooling kernel must be an odd integer "
            "(padding kernel//2 keeps the sequence length only for odd kernels), e.g. 5 or 7"
        )


def int_at_least(minimum: int, meaning: str) -> Validator:
    """attrs validator factory: an integer >= ``minimum``; ``meaning`` says why, in parentheses.

    >>> check_divisor = int_at_least(2, "anchors and window take B // n each")
    """

    def check(instance: Any, attribute: attrs.Attribute, value: int) -> None:
        if not _is_int(value) or value < minimum:
            raise ConfigError(
                f"{attribute.name}={value!r} is invalid: it must be an integer >= {minimum} "
                f"({meaning})"
            )

    check.__doc__ = f"attrs validator: an integer >= {minimum} ({meaning})."
    return check


def unit_interval(meaning: str, *, optional: bool = False) -> Validator:
    """attrs validator factory: a number in [0, 1]; ``meaning`` names what the number is.

    ``optional=True`` also accepts None (a field typed ``float | None``).

    >>> check_alpha = unit_interval("the share chosen by exact attention")
    """

    def check(instance: Any, attribute: attrs.Attribute, value: float | None) -> None:
        if value is None and optional:
            return
        if not _is_number(value) or not 0 <= value <= 1:
            none = " or None" if optional else ""
            raise ConfigError(
                f"{attribute.name}={value!r} is invalid: it must be a number in [0, 1]{none}, "
                f"{meaning}"
            )

    check.__doc__ = f"attrs validator: a number in [0, 1], {meaning}."
    return check
