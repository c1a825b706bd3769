"""Helpers for the task tests: an independent reader and solver of bAbI facts."""

from __future__ import annotations

import re

import pytest

_ACT = r"(Mary|John|Daniel|Sandra|Fred|Bill|Jeff)"
_LOC = r"(bathroom|bedroom|garden|hallway|kitchen|office)"
_OBJ = r"(apple|football|milk)"
FACT_FORMS = {
    "move": rf"{_ACT} (?:moved to|went to|journeyed to|travelled to|went back to) the {_LOC}\.",
    "take": rf"{_ACT} (?:got|picked up|grabbed|took) the {_OBJ} there\.",
    "drop": rf"{_ACT} (?:dropped|discarded|put down|left) the {_OBJ}\.",
    "give": rf"{_ACT} (?:gave|handed|passed) the {_OBJ} to {_ACT}\.",
    "rel": rf"The {_LOC} is (north|south|east|west) of the {_LOC}\.",
}
_ANY_FACT = re.compile("|".join(f"(?P<{k}>{v})" for k, v in FACT_FORMS.items()))


def read_facts(text: str) -> list[tuple[str, tuple[str, ...], str]]:
    """Every bAbI fact sentence found in ``text``, in order: (kind, slots, sentence)."""
    found = []
    for m in _ANY_FACT.finditer(text):
        kind = m.lastgroup
        sentence = m.group(kind)
        slots = re.fullmatch(FACT_FORMS[kind], sentence).groups()
        found.append((kind, slots, sentence))
    return found


OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}


def solve(question: str, facts: list[tuple[str, tuple[str, ...], str]]) -> set[str]:
    """Answer a bAbI question from the facts alone (written independently of the generator)."""
    pos: dict[str, str] = {}
    holder: dict[str, str] = {}
    history: dict[str, list[str]] = {}
    gives: list[tuple[str, str, str]] = []
    relations: list[tuple[str, str, str]] = []

    def put(obj: str, loc: str) -> None:
        h = history.setdefault(obj, [])
        if not h or h[-1] != loc:
            h.append(loc)

    for kind, slots, _ in facts:
        if kind == "move":
            actor, loc = slots
            pos[actor] = loc
            for obj, who in holder.items():
                if who == actor:
                    put(obj, loc)
        elif kind == "take":
            actor, obj = slots
            holder[obj] = actor
            put(obj, pos[actor])
        elif kind == "drop":
            holder.pop(slots[1])
        elif kind == "give":
            giver, obj, receiver = slots
            holder[obj] = receiver
            gives.append((giver, obj, receiver))
        else:
            relations.append(slots)

    q = question.removeprefix("Question: ")
    if m := re.fullmatch(r"Where is the (\w+)\?", q):
        return {history[m[1]][-1]}
    if m := re.fullmatch(r"Where is (\w+)\?", q):
        return {pos[m[1]]}
    if m := re.fullmatch(r"Where was the (\w+) before the (\w+)\?", q):
        h = history[m[1]]
        return {h[i - 1] for i, loc in enumerate(h) if loc == m[2] and i > 0}
    if m := re.fullmatch(r"What is (north|south|east|west) of the (\w+)\?", q):
        d, b = m[1], m[2]
        return {x for x, dd, y in relations if dd == d and y == b} | {
            y for x, dd, y in relations if dd == OPPOSITE[d] and x == b
        }
    if m := re.fullmatch(r"What is the (\w+) (north|south|east|west) of\?", q):
        a, d = m[1], m[2]
        return {y for x, dd, y in relations if dd == d and x == a} | {
            x for x, dd, y in relations if dd == OPPOSITE[d] and y == a
        }
    if m := re.fullmatch(r"Who gave the (\w+) to (\w+)\?", q):
        return {g for g, o, r in gives if o == m[1] and r == m[2]}
    if m := re.fullmatch(r"What did (\w+) give to (\w+)\?", q):
        return {o for g, o, r in gives if g == m[1] and r == m[2]}
    if m := re.fullmatch(r"Who did (\w+) give the (\w+) to\?", q):
        return {r for g, o, r in gives if g == m[1] and o == m[2]}
    raise AssertionError(f"unexpected question {question!r}")


class BabiOracle:
    """Reads bAbI facts from text and answers questions, independently of the generator."""

    read_facts = staticmethod(read_facts)
    solve = staticmethod(solve)


@pytest.fixture
def babi_oracle() -> type[BabiOracle]:
    return BabiOracle
