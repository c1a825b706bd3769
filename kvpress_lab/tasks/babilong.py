"""BABILong-style tasks qa1-qa5 (Kuratov et al. 2024, "BABILong: Testing the Limits of LLMs with
Long Context Reasoning-in-a-Haystack").

The facts of a generated bAbI story (:mod:`kvpress_lab.tasks.babi`) are spread, in order, over
random sentence boundaries of real background prose (:mod:`kvpress_lab.tasks.background`), and
the prose is grown until the context reaches the target length. Results are "BABILong-style":
the facts are generated here, not taken from the released BABILong files.
"""

from __future__ import annotations

import bisect
import functools

from kvpress_lab.tasks.babi import make_story
from kvpress_lab.tasks.background import Background, babilong_background
from kvpress_lab.tasks.base import (
    CountTokens,
    Sample,
    SampleGenerator,
    fit_length,
    make_rng,
    sample_id,
)

_ITEMS_RULE = (
    " If a person took an item in one place and then went to another place, the item is in the "
    "second place as well. If a person dropped an item in one place and then went to another "
    "place, the item stays in the first place."
)
INSTRUCTIONS: dict[str, str] = {
    "qa1": (
        "I will give you context with the facts about positions of different persons hidden in "
        "some random text and a question. You need to answer the question based only on the "
        "information from the facts. If a person was in different locations, use the latest "
        "location to answer the question."
    ),
    "qa2": (
        "I will give you context with facts about the locations and actions of different persons "
        "hidden in some random text and a question. You need to answer the question based only "
        "on the information from the facts." + _ITEMS_RULE
    ),
    "qa3": (
        "I will give you context with facts about the locations and actions of different persons "
        "hidden in some random text and a question. You need to answer the question based only "
        "on the information from the facts." + _ITEMS_RULE + " To say where an item was before "
        "a location, give the place it was in just before it was taken to that location."
    ),
    "qa4": (
        "I will give you context with facts about some places and how they lie relative to each "
        "other, hidden in some random text, and a question. You need to answer the question "
        "based only on the information from the facts."
    ),
    "qa5": (
        "I will give you context with facts about different persons, where they go and which "
        "items they take and pass to each other, hidden in some random text, and a question. "
        "You need to answer the question based only on the information from the facts."
    ),
}


def _sentence_starts(background: Background, start: int) -> list[int]:
    """Offsets ``j`` (from ``start``, going round the text) where a sentence begins."""
    ends, size = background.sentence_end, len(background.pieces)
    return [0] + [j for j in range(1, size + 1) if ends[(start + j - 1) % size]]


def _generate(
    qa: str, *, target_tokens: int, seed: int, index: int, count_tokens: CountTokens
) -> Sample:
    task = f"babilong-{qa}"
    rng = make_rng(task, target_tokens, seed, index)
    story = make_story(qa, rng)
    background = babilong_background()
    pieces, size = background.pieces, len(background.pieces)
    start = rng.randrange(size)
    while not background.sentence_end[start - 1]:  # begin the excerpt at a sentence start
        start = (start + 1) % size
    starts = _sentence_starts(background, start)
    fractions = sorted(rng.random() for _ in story.facts)
    head = INSTRUCTIONS[qa] + "\n\n<context>\n"

    def positions(n: int) -> list[int]:
        usable = starts[: bisect.bisect_right(starts, n)]
        out = []
        for f in fractions:
            i = bisect.bisect_left(usable, f * n)
            out.append(min(usable[max(i - 1, 0) : i + 1], key=lambda p: abs(p - f * n)))
        return out

    def build(n: int) -> str:
        window = [pieces[(start + j) % size] for j in range(n)]
        parts: list[str] = []
        done = 0
        for fact, pos in zip(story.facts, positions(n), strict=True):
            parts.extend(window[done:pos])
            parts.append(fact)
            done = pos
        parts.extend(window[done:])
        return head + " ".join(parts) + "\n</context>"

    fit = fit_length(build, count_tokens, target_tokens, max_units=size, task=task)
    return Sample(
        task=task,
        context=fit.text,
        question=f"Question: {story.question}",
        answers=(story.answer,),
        answer_prefix=story.answer_prefix,
        metric="babilong",
        labels=story.labels,
        sample_id=sample_id(task, target_tokens, seed, index),
        meta={
            "context_tokens": fit.tokens,
            "facts": list(story.facts),
            "fact_positions": positions(fit.units),
            "background": background.name,
            **({"note": background.note} if background.note else {}),
            "background_start": start,
            "filler_units": fit.units,
        },
    )


def babilong_generator(qa: str) -> SampleGenerator:
    """The sample generator of BABILong-style task ``qa`` (``"qa1"`` .. ``"qa5"``)."""
    if qa not in INSTRUCTIONS:
        raise ValueError(f"unknown bAbI task {qa!r}")
    return functools.partial(_generate, qa)
