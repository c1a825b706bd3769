"""RULER-style synthetic retrieval tasks (Hsieh et al. 2024, "RULER: What's the Real Context Size
of Your Long-Context Language Models?"): single needle, multi-key needle and variable tracking.

The haystack is RULER's "noise" text; needles are inserted at seeded depths at sentence (or line)
boundaries, and the filler is grown until the context reaches the target length.
"""

from __future__ import annotations

import functools
import random
import re
import string
from importlib import resources

from kvpress_lab.errors import InputError
from kvpress_lab.tasks.base import CountTokens, Sample, fit_length, make_rng, sample_id

NOISE_SENTENCES: tuple[str, ...] = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
"""RULER's noise haystack, repeated as filler."""

NIAH_PREAMBLE = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards.\n"
)
VT_PREAMBLE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
)
UNLIMITED_UNITS = 10_000_000


@functools.lru_cache(maxsize=4)
def wonderwords_list(name: str) -> tuple[str, ...]:
    """One of wonderwords' bundled lists (``"adjective"``, ``"noun"``, ``"verb"``), sorted.

    Only lower-case single words are kept and profanity is left out. Read from the package's
    files so that drawing from them is seeded by our own generator.
    """
    try:
        assets = resources.files("wonderwords.assets")
    except ModuleNotFoundError as exc:
        raise InputError(
            "the RULER tasks need the word lists of wonderwords; install it with "
            "`pip install wonderwords==3.0.1`"
        ) from exc

    def read(file: str) -> set[str]:
        text = assets.joinpath(file).read_text(encoding="utf-8")
        return {w.strip() for w in text.splitlines() if re.fullmatch(r"[a-z]+", w.strip())}

    return tuple(sorted(read(f"{name}list.txt") - read("profanitylist.txt")))


def key_words() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Adjectives and nouns from wonderwords' bundled lists (see :func:`wonderwords_list`)."""
    return wonderwords_list("adjective"), wonderwords_list("noun")


def random_key(rng: random.Random) -> str:
    """A RULER word key: ``adjective-noun``."""
    adjectives, nouns = key_words()
    return f"{rng.choice(adjectives)}-{rng.choice(nouns)}"


def random_number(rng: random.Random, digits: int) -> str:
    """A number with exactly ``digits`` digits (no leading zero)."""
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def needle_sentence(key: str, value: str) -> str:
    """The RULER needle ``One of the special magic numbers for KEY is: VALUE.``"""
    return f"One of the special magic numbers for {key} is: {value}."


def _noise(n: int) -> list[str]:
    return [NOISE_SENTENCES[i % len(NOISE_SENTENCES)] for i in range(n)]


def _insert(units: list[str], items: list[str], depths: list[float]) -> list[str]:
    """Insert ``items`` (in order) between ``units`` at the relative ``depths`` (sorted)."""
    out: list[str] = []
    cuts = [round(d * len(units)) for d in depths]
    pos = 0
    for item, cut in zip(items, cuts, strict=True):
        out.extend(units[pos:cut])
        out.append(item)
        pos = max(pos, cut)
    out.extend(units[pos:])
    return out


def niah(*, target_tokens: int, seed: int, index: int, count_tokens: CountTokens) -> Sample:
    """RULER niah_single_1: one number needle hidden in the noise haystack."""
    task = "niah"
    rng = make_rng(task, target_tokens, seed, index)
    key, value, depth = random_key(rng), random_number(rng, 7), rng.random()
    needle = needle_sentence(key, value)

    def build(n: int) -> str:
        return NIAH_PREAMBLE + " ".join(_insert(_noise(n), [needle], [depth]))

    fit = fit_length(build, count_tokens, target_tokens, max_units=UNLIMITED_UNITS, task=task)
    return _niah_sample(
        task, fit, key, value, depth, needle, sample_id(task, target_tokens, seed, index)
    )


def _niah_sample(
    task: str, fit, key: str, value: str, depth: float, needle: str, sid: str
) -> Sample:
    """The RULER needle question, answer prefix and metric around a fitted haystack."""
    return Sample(
        task=task,
        context=fit.text,
        question=f"What is the special magic number for {key} mentioned in the provided text?",
        answers=(value,),
        answer_prefix=f"The special magic number for {key} mentioned in the provided text is",
        metric="string_match_all",
        sample_id=sid,
        meta={
            "context_tokens": fit.tokens,
            "depth": depth,
            "needle": needle,
            "key": key,
            "filler_units": fit.units,
        },
    )


def niah_multikey(
    *, target_tokens: int, seed: int, index: int, count_tokens: CountTokens
) -> Sample:
    """RULER niah_multikey_2: every haystack line is a needle with its own key; one is asked."""
    task = "niah-multikey"
    rng = make_rng(task, target_tokens, seed, index)
    key, value, depth = random_key(rng), random_number(rng, 7), rng.random()
    needle = needle_sentence(key, value)
    # Distractors come from their own stream so that line i never depends on how many are used.
    stream = make_rng(task, target_tokens, seed, index, "distractors")
    used_keys, used_values = {key}, {value}
    lines: list[str] = []

    def distractors(n: int) -> list[str]:
        while len(lines) < n:
            k = random_key(stream)
            v = random_number(stream, 7)
            if k in used_keys or v in used_values:
                continue
            used_keys.add(k)
            used_values.add(v)
            lines.append(needle_sentence(k, v))
        return lines[:n]

    def build(n: int) -> str:
        return NIAH_PREAMBLE + "\n".join(_insert(distractors(n), [needle], [depth]))

    adjectives, nouns = key_words()
    max_lines = len(adjectives) * len(nouns) // 2
    fit = fit_length(build, count_tokens, target_tokens, max_units=max_lines, task=task)
    return _niah_sample(
        task, fit, key, value, depth, needle, sample_id(task, target_tokens, seed, index)
    )


def variable_names(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct names of five random upper-case letters."""
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    return names


def variable_tracking(
    *, target_tokens: int, seed: int, index: int, count_tokens: CountTokens, hops: int = 4
) -> Sample:
    """RULER variable tracking: one chain ``VAR A = 12345``, ``VAR B = VAR A``, ... in noise.

    A chain of ``hops`` hops names ``hops + 1`` variables; all of them are the answer.
    """
    task = "vt"
    rng = make_rng(task, target_tokens, seed, index)
    names = variable_names(rng, hops + 1)
    value = random_number(rng, 5)
    statements = [f"VAR {names[0]} = {value}."]
    statements += [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:], strict=False)]
    depths = sorted(rng.random() for _ in statements)

    def build(n: int) -> str:
        return VT_PREAMBLE + " ".join(_insert(_noise(n), statements, depths))

    fit = fit_length(build, count_tokens, target_tokens, max_units=UNLIMITED_UNITS, task=task)
    return Sample(
        task=task,
        context=fit.text,
        question=(
            f"Question: Find all variables that are assigned the value {value} in the text above."
        ),
        answers=tuple(names),
        answer_prefix=(
            "Answer: According to the chain(s) of variable assignment in the text above, "
            f"{len(names)} variables are assigned the value {value}, they are: "
        ),
        metric="string_match_all",
        sample_id=sample_id(task, target_tokens, seed, index),
        meta={
            "context_tokens": fit.tokens,
            "depths": depths,
            "statements": statements,
            "value": value,
            "filler_units": fit.units,
        },
    )
