"""Shared types and helpers for the long-context tasks.

A task turns ``(target_tokens, seed, index)`` into one :class:`Sample` whose ``context`` is
``target_tokens`` long (within 2 %) in the model's tokens. Tasks follow RULER (Hsieh et al.
2024, "RULER: What's the Real Context Size of Your Long-Context Language Models?") and BABILong
(Kuratov et al. 2024, "BABILong: Testing the Limits of LLMs with Long Context
Reasoning-in-a-Haystack").
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Protocol

import attrs

from kvpress_lab.errors import InputError

CountTokens = Callable[[str], int]
"""Returns the number of model tokens of a text."""

METRICS: tuple[str, ...] = ("string_match_all", "string_match_part", "babilong")
"""Names accepted in :attr:`Sample.metric`."""

LENGTH_TOLERANCE = 0.02
"""Largest relative difference allowed between a context's length and its target."""


@attrs.frozen
class Sample:
    """One evaluation example: a long context, a question and the reference answers."""

    task: str
    context: str
    question: str
    answers: tuple[str, ...]
    answer_prefix: str = ""
    metric: str = "string_match_all"
    labels: tuple[str, ...] = ()
    sample_id: str = ""
    meta: dict = attrs.field(factory=dict, hash=False)


class SampleGenerator(Protocol):
    """Builds sample number ``index`` of a task; the same arguments give the same sample."""

    def __call__(
        self, *, target_tokens: int, seed: int, index: int, count_tokens: CountTokens
    ) -> Sample: ...


def make_rng(*parts: object) -> random.Random:
    """A private random generator seeded from ``parts`` (stable across runs and processes)."""
    return random.Random("|".join(str(p) for p in parts))


def sample_id(task: str, target_tokens: int, seed: int, index: int) -> str:
    """The stable id of a generated sample."""
    return f"{task}-{target_tokens}-{seed}-{index}"


@attrs.frozen
class Fit:
    """The result of :func:`fit_length`."""

    text: str
    units: int
    tokens: int


def fit_length(
    build: Callable[[int], str],
    count_tokens: CountTokens,
    target: int,
    *,
    max_units: int,
    task: str,
    tolerance: float = LENGTH_TOLERANCE,
) -> Fit:
    """Find the number of filler units ``n`` for which ``build(n)`` is ``target`` tokens long.

    ``build(n)`` must grow with ``n`` (roughly additively). The token count is measured only a
    handful of times: a secant search on the tokens-per-unit rate, then a bisection between the
    closest measurements below and above the target if the secant did not land close enough.
    Raises :class:`InputError` when the target cannot be met within ``tolerance``.
    """
    measured: dict[int, int] = {}

    def measure(n: int) -> int:
        if n not in measured:
            measured[n] = int(count_tokens(build(n)))
        return measured[n]

    def close_enough(tokens: int) -> bool:
        return abs(tokens - target) <= 0.01 * target

    base = measure(0)
    if base > target * (1 + tolerance):
        raise InputError(
            f"target_tokens={target} is too small for task {task!r}: its instructions and facts "
            f"alone take {base} tokens; ask for at least {int(base * 1.05) + 1}"
        )
    if not close_enough(base):
        probe = min(max_units, 32)
        n, tokens = probe, measure(probe)
        for _ in range(8):
            if close_enough(tokens) or n == 0:
                break
            rate = max((tokens - base) / n, 1e-3)  # tokens per unit, averaged from 0
            guess = min(max_units, max(1, round(n + (target - tokens) / rate)))
            if guess in measured:
                break
            n, tokens = guess, measure(guess)
        below = [m for m, t in measured.items() if t <= target]
        above = [m for m, t in measured.items() if t >= target]
        if below and above and not any(close_enough(t) for t in measured.values()):
            lo, hi = max(below), min(above)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if measure(mid) <= target:
                    lo = mid
                else:
                    hi = mid
    best = min(measured, key=lambda m: (abs(measured[m] - target), m))
    tokens = measured[best]
    if abs(tokens - target) > tolerance * target:
        if tokens < target and best >= max_units:
            raise InputError(
                f"target_tokens={target} is too long for task {task!r}: its filler text runs "
                f"out at about {tokens} tokens"
            )
        raise InputError(
            f"cannot fit task {task!r} to target_tokens={target} within "
            f"{tolerance:.0%}: the closest context has {tokens} tokens; use a larger target"
        )
    return Fit(text=build(best), units=best, tokens=tokens)


def check_generation_args(target_tokens: int, n_samples: int, seed: int) -> None:
    """Validate the arguments shared by every generator (raises :class:`InputError`)."""
    for name, value, low in (("target_tokens", target_tokens, 1), ("n_samples", n_samples, 1)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{name} must be an integer, got {value!r}")
        if value < low:
            raise InputError(f"{name} must be at least {low}, got {value}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed must be an integer, got {seed!r}")
