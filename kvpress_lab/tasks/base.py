"""Shared types and helpers for the long-context tasks.

A task turns ``(target_tokens, seed, index)`` into one :class:`Sample` whose ``context`` is
``target_tokens`` long (within 2 %) in the model's tokens. Tasks follow RULER (Hsieh et al.
2024, "RULER: What's the Real Context Size of Your Long-Context Language Models?") and BABILong
(Kuratov et al. 2024, "BABILong: Testing the Limits of LLMs with Long Context
Reasoning-in-a-Haystack").
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable, Hashable
from typing import Protocol, TypeVar

import attrs

from kvpress_lab.errors import InputError

CountTokens = Callable[[str], int]
"""Returns the number of model tokens of a text."""

METRICS: tuple[str, ...] = ("string_match_all", "string_match_part", "babilong")
"""Names accepted in :attr:`Sample.metric`."""

LENGTH_TOLERANCE = 0.02
"""Largest relative difference allowed between a context's length and its target."""


@attrs.frozen
class Question:
    """One question over a sample's context, with its own references and answer prefix."""

    question: str
    answers: tuple[str, ...]
    answer_prefix: str = ""
    labels: tuple[str, ...] = ()


def _check_questions(sample: Sample, attribute: attrs.Attribute, value: tuple) -> None:
    if not value:
        return
    first = value[0]
    own = (sample.question, sample.answers, sample.answer_prefix, sample.labels)
    if (first.question, first.answers, first.answer_prefix, first.labels) != own:
        raise InputError(
            f"sample {sample.sample_id!r}: its question, answers, answer_prefix and labels must be "
            "those of questions[0]; build it with Sample.from_questions(...)"
        )


@attrs.frozen
class Sample:
    """One evaluation example: a long context, a question and the reference answers.

    A sample may ask several questions over one context (``questions``, at least two; the
    sample's own ``question``, ``answers``, ``answer_prefix`` and ``labels`` are then those of
    the first). :meth:`per_question` splits it into one single-question sample per question, all
    with the same context and ``sample_id``; a single-question sample splits into itself.
    """

    task: str
    context: str
    question: str
    answers: tuple[str, ...]
    answer_prefix: str = ""
    metric: str = "string_match_all"
    labels: tuple[str, ...] = ()
    sample_id: str = ""
    meta: dict = attrs.field(factory=dict, hash=False)
    questions: tuple[Question, ...] = attrs.field(default=(), validator=_check_questions)

    @classmethod
    def from_questions(cls, questions: tuple[Question, ...] | list[Question], **fields) -> Sample:
        """A sample asking every one of ``questions`` (in order) over one context."""
        questions = tuple(questions)
        if not questions:
            raise InputError("a sample needs at least one question")
        first = questions[0]
        return cls(
            question=first.question,
            answers=first.answers,
            answer_prefix=first.answer_prefix,
            labels=first.labels,
            questions=questions if len(questions) > 1 else (),
            **fields,
        )

    @property
    def n_questions(self) -> int:
        """How many questions the sample asks over its context."""
        return max(1, len(self.questions))

    def per_question(self) -> list[Sample]:
        """One single-question sample per question (``meta["question_index"]`` says which)."""
        if not self.questions:
            return [self]
        return [
            attrs.evolve(
                self,
                question=q.question,
                answers=q.answers,
                answer_prefix=q.answer_prefix,
                labels=q.labels,
                questions=(),
                meta={**self.meta, "question_index": i, "n_questions": len(self.questions)},
            )
            for i, q in enumerate(self.questions)
        ]


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


U = TypeVar("U", bound=Hashable)


def fit_units(
    build: Callable[[list[U]], str],
    stream: Callable[[int], list[U]],
    unit_tokens: Callable[[U], int],
    count_tokens: CountTokens,
    target: int,
    *,
    max_units: int,
    task: str,
    what: str = "instructions and facts",
    spare: int = 200,
    tolerance: float = LENGTH_TOLERANCE,
) -> tuple[Fit, list[U]]:
    """Fit a context of whole units (documents, haystack lines) to ``target`` tokens.

    ``stream(n)`` gives the first ``n`` units (the same ones for every ``n``), ``build(units)``
    renders a context around them and ``unit_tokens(u)`` says about how many tokens unit ``u``
    adds. First the number of units is fitted as by :func:`fit_length`. Where units are too
    coarse for the target (no count lands within ``tolerance``), the counts just below and just
    above the target are corrected by swapping units for later ones of the stream (up to
    ``spare`` of them) whose sizes close the gap, and the result is measured whole. Returns the
    fit and the units used, in order.
    """
    measured: dict[int, int] = {}
    current = [0]

    def build_n(n: int) -> str:
        current[0] = n
        return build(stream(n))

    def measure(text: str) -> int:  # fit_length measures each build(n) right after making it
        measured[current[0]] = tokens = int(count_tokens(text))
        return tokens

    base = measure(build_n(0))
    if base > target * (1 + tolerance):
        raise InputError(
            f"target_tokens={target} is too small for task {task!r}: its {what} alone take "
            f"{base} tokens; ask for at least {int(base * 1.05) + 1}"
        )
    try:
        fit = fit_length(build_n, measure, target, max_units=max_units, task=task)
        return fit, stream(fit.units)
    except InputError:
        below = max((n for n, t in measured.items() if t <= target), default=0)
        if below >= max_units:
            raise
    sizes: dict[U, int] = {}

    def size(u: U) -> int:
        if u not in sizes:
            sizes[u] = int(unit_tokens(u))
        return sizes[u]

    units = stream(below + 1 + spare)
    closest: int | None = None
    for k in (below, below + 1):
        chosen, rest = list(units[:k]), list(units[k:])
        for _ in range(3):  # swap by estimated sizes, then measure the whole context
            text = build(chosen)
            tokens = int(count_tokens(text))
            if closest is None or abs(tokens - target) < abs(closest - target):
                closest = tokens
            if abs(tokens - target) <= tolerance * target:
                return Fit(text=text, units=len(chosen), tokens=tokens), chosen
            _swap_towards(chosen, rest, size, tokens - target, 0.005 * target)
    raise InputError(
        f"cannot fit task {task!r} to target_tokens={target} within {tolerance:.0%}: the "
        f"closest context has {closest} tokens; use a larger target"
    )


def _swap_towards(
    chosen: list, rest: list, size: Callable, over: int, good_enough: float, steps: int = 16
) -> None:
    """Swap items of ``chosen`` with items of ``rest`` (in place) to cut ``over`` towards 0."""
    for _ in range(steps):
        if abs(over) <= good_enough or not rest:
            return
        order = sorted(range(len(rest)), key=lambda j: size(rest[j]))
        rest_sizes = [size(rest[j]) for j in order]
        best = None  # (remaining error, index in chosen, index in rest, change)
        for i, c in enumerate(chosen):
            want = size(c) - over  # the size of a replacement that would close the gap
            at = bisect.bisect_left(rest_sizes, want)
            for j in (at - 1, at):
                if 0 <= j < len(rest_sizes):
                    change = rest_sizes[j] - size(c)
                    error = abs(over + change)
                    if error < abs(over) and (best is None or error < best[0]):
                        best = (error, i, order[j], change)
        if best is None:
            return
        _, i, j, change = best
        chosen[i], rest[j] = rest[j], chosen[i]
        over += change


def check_generation_args(target_tokens: int, n_samples: int, seed: int) -> None:
    """Validate the arguments shared by every generator (raises :class:`InputError`)."""
    for name, value, low in (("target_tokens", target_tokens, 1), ("n_samples", n_samples, 1)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{name} must be an integer, got {value!r}")
        if value < low:
            raise InputError(f"{name} must be at least {low}, got {value}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed must be an integer, got {seed!r}")
