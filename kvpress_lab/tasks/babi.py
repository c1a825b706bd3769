"""A small generator of bAbI-style stories for BABILong tasks qa1-qa5.

BABILong (Kuratov et al. 2024) hides the facts of the bAbI tasks (Weston et al. 2015) in long
background text. No package ships the bAbI files, so the facts are generated here from the
public task definitions: actors, locations, objects and sentence forms. Events are drawn at
random but only when legal in a tiny world simulator, and the answer is computed by the
simulator, so every story is self-consistent and its answer follows from its facts.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import attrs

ACTORS: tuple[str, ...] = ("Mary", "John", "Daniel", "Sandra")
GIVE_ACTORS: tuple[str, ...] = ("Fred", "Bill", "Jeff", "Mary")
LOCATIONS: tuple[str, ...] = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
OBJECTS: tuple[str, ...] = ("apple", "football", "milk")
MOVE_VERBS: tuple[str, ...] = ("moved to", "went to", "journeyed to", "travelled to")
RETURN_VERB = "went back to"
TAKE_VERBS: tuple[str, ...] = ("got", "picked up", "grabbed", "took")
DROP_VERBS: tuple[str, ...] = ("dropped", "discarded", "put down", "left")
GIVE_VERBS: tuple[str, ...] = ("gave", "handed", "passed")
DIRECTIONS: dict[str, tuple[int, int]] = {
    "north": (0, 1),
    "south": (0, -1),
    "east": (1, 0),
    "west": (-1, 0),
}
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}


@attrs.frozen
class Move:
    actor: str
    location: str
    verb: str

    def render(self) -> str:
        return f"{self.actor} {self.verb} the {self.location}."


@attrs.frozen
class Take:
    actor: str
    obj: str
    verb: str

    def render(self) -> str:
        return f"{self.actor} {self.verb} the {self.obj} there."


@attrs.frozen
class Drop:
    actor: str
    obj: str
    verb: str

    def render(self) -> str:
        return f"{self.actor} {self.verb} the {self.obj}."


@attrs.frozen
class Give:
    giver: str
    obj: str
    receiver: str
    verb: str

    def render(self) -> str:
        return f"{self.giver} {self.verb} the {self.obj} to {self.receiver}."


@attrs.frozen
class Relation:
    """``The {a} is {direction} of the {b}.``"""

    a: str
    direction: str
    b: str

    def render(self) -> str:
        return f"The {self.a} is {self.direction} of the {self.b}."


Event = Move | Take | Drop | Give | Relation


class SimulationError(ValueError):
    """An event that is impossible in the current state of the world (a generator bug)."""


@attrs.define
class World:
    """Where every actor and object is, who holds what, and each object's path of rooms."""

    actor_at: dict[str, str] = attrs.field(factory=dict)
    visited: dict[str, set[str]] = attrs.field(factory=dict)
    holder: dict[str, str] = attrs.field(factory=dict)
    object_at: dict[str, str] = attrs.field(factory=dict)
    object_path: dict[str, list[str]] = attrs.field(factory=dict)
    gives: list[Give] = attrs.field(factory=list)

    def held_by(self, actor: str) -> list[str]:
        return sorted(o for o, h in self.holder.items() if h == actor)

    def _place(self, obj: str, location: str) -> None:
        self.object_at[obj] = location
        path = self.object_path.setdefault(obj, [])
        if not path or path[-1] != location:
            path.append(location)

    def legal(self, event: Event) -> bool:
        if isinstance(event, Move):
            here = self.actor_at.get(event.actor)
            if event.location == here:
                return False
            return event.verb != RETURN_VERB or event.location in self.visited.get(
                event.actor, set()
            )
        if isinstance(event, Take):
            if event.actor not in self.actor_at or event.obj in self.holder:
                return False
            where = self.object_at.get(event.obj)
            return where is None or where == self.actor_at[event.actor]
        if isinstance(event, Drop):
            return self.holder.get(event.obj) == event.actor
        if isinstance(event, Give):
            return (
                event.giver != event.receiver
                and self.holder.get(event.obj) == event.giver
                and self.actor_at.get(event.receiver) is not None
                and self.actor_at.get(event.receiver) == self.actor_at.get(event.giver)
            )
        return isinstance(event, Relation)

    def apply(self, event: Event) -> None:
        if not self.legal(event):
            raise SimulationError(f"illegal event: {event.render()}")
        if isinstance(event, Move):
            self.actor_at[event.actor] = event.location
            self.visited.setdefault(event.actor, set()).add(event.location)
            for obj in self.held_by(event.actor):
                self._place(obj, event.location)
        elif isinstance(event, Take):
            self.holder[event.obj] = event.actor
            self._place(event.obj, self.actor_at[event.actor])
        elif isinstance(event, Drop):
            del self.holder[event.obj]
        elif isinstance(event, Give):
            self.holder[event.obj] = event.receiver
            self.gives.append(event)


def simulate(events: Sequence[Event]) -> World:
    """Replay ``events`` from an empty world (raises :class:`SimulationError` if one is illegal)."""
    world = World()
    for event in events:
        world.apply(event)
    return world


@attrs.frozen
class Story:
    """The facts of one bAbI-style story, its question and its answer."""

    task: str
    facts: tuple[str, ...]
    question: str
    answer: str
    answer_prefix: str
    labels: tuple[str, ...]
    events: tuple[Event, ...] = attrs.field(eq=False, repr=False)


# -- answering (used by the generators and by the tests) ------------------------------------


def where_is_actor(events: Sequence[Event], actor: str) -> str | None:
    """qa1: the actor's latest location."""
    return simulate(events).actor_at.get(actor)


def where_is_object(events: Sequence[Event], obj: str) -> str | None:
    """qa2: the object's current location (its holder's location while it is held)."""
    return simulate(events).object_at.get(obj)


def where_before(events: Sequence[Event], obj: str, location: str) -> str | None:
    """qa3: where the object was just before it reached ``location`` (which it reached once)."""
    path = simulate(events).object_path.get(obj, [])
    if path.count(location) != 1 or path.index(location) == 0:
        return None
    return path[path.index(location) - 1]


def related(events: Sequence[Event], direction: str, *, of: str) -> list[str]:
    """qa4: every location stated (directly or as the inverse) to be ``direction`` of ``of``."""
    found = []
    for e in events:
        if isinstance(e, Relation):
            if e.b == of and e.direction == direction:
                found.append(e.a)
            elif e.a == of and e.direction == OPPOSITE[direction]:
                found.append(e.b)
    return found


def give_answers(
    events: Sequence[Event],
    *,
    giver: str | None = None,
    obj: str | None = None,
    receiver: str | None = None,
) -> set[str]:
    """qa5: the values of the one unspecified slot over all gives that match the given slots."""
    matches = [
        g
        for g in simulate(events).gives
        if (giver is None or g.giver == giver)
        and (obj is None or g.obj == obj)
        and (receiver is None or g.receiver == receiver)
    ]
    if giver is None:
        return {g.giver for g in matches}
    if obj is None:
        return {g.obj for g in matches}
    return {g.receiver for g in matches}


# -- generation ---------------------------------------------------------------------------


def _choose_verb(
    rng: random.Random, verbs: Sequence[str], make: Callable[[str], Event], used: set[str]
) -> Event | None:
    """An event with a verb whose sentence was not written yet (facts are never repeated)."""
    options = [make(v) for v in verbs]
    options = [e for e in options if e.render() not in used]
    return rng.choice(options) if options else None


def _random_event(
    rng: random.Random, world: World, actors: Sequence[str], kinds: Sequence[str], used: set[str]
) -> Event | None:
    kind = rng.choice(kinds)
    actor = rng.choice(actors)
    if kind == "move":
        holders = sorted(set(world.holder.values()))
        if holders and rng.random() < 0.5:
            actor = rng.choice(holders)  # carrying objects around makes qa2/qa3 non-trivial
        here = world.actor_at.get(actor)
        location = rng.choice([loc for loc in LOCATIONS if loc != here])
        verbs = list(MOVE_VERBS)
        if location in world.visited.get(actor, set()):
            verbs.append(RETURN_VERB)
        return _choose_verb(rng, verbs, lambda v: Move(actor, location, v), used)
    if kind == "take":
        free = [
            o
            for o in OBJECTS
            if o not in world.holder
            and actor in world.actor_at
            and world.object_at.get(o, world.actor_at[actor]) == world.actor_at[actor]
        ]
        if not free:
            return None
        obj = rng.choice(free)
        return _choose_verb(rng, TAKE_VERBS, lambda v: Take(actor, obj, v), used)
    if kind == "drop":
        held = world.held_by(actor)
        if not held:
            return None
        obj = rng.choice(held)
        return _choose_verb(rng, DROP_VERBS, lambda v: Drop(actor, obj, v), used)
    if kind == "give":
        holders = sorted(set(world.holder.values()))
        if not holders:
            return None
        giver = rng.choice(holders)
        mates = [a for a in actors if a != giver and world.actor_at.get(a) == world.actor_at[giver]]
        if not mates:
            return None
        obj, receiver = rng.choice(world.held_by(giver)), rng.choice(mates)
        return _choose_verb(rng, GIVE_VERBS, lambda v: Give(giver, obj, receiver, v), used)
    raise ValueError(kind)


def _random_events(
    rng: random.Random, n_facts: int, actors: Sequence[str], kinds: Sequence[str]
) -> list[Event] | None:
    world, events, used = World(), [], set()
    for _ in range(100 * n_facts):
        if len(events) == n_facts:
            break
        event = _random_event(rng, world, actors, kinds, used)
        if event is not None and world.legal(event):
            world.apply(event)
            events.append(event)
            used.add(event.render())
    return events if len(events) == n_facts else None


def _story(
    task: str,
    events: Sequence[Event],
    question: str,
    answer: str,
    prefix: str,
    labels: Sequence[str],
) -> Story:
    return Story(
        task=task,
        facts=tuple(e.render() for e in events),
        question=question,
        answer=answer,
        answer_prefix=prefix,
        labels=tuple(labels),
        events=tuple(events),
    )


def _qa1(rng: random.Random, n_facts: int) -> Story | None:
    events = _random_events(rng, n_facts, ACTORS, ["move"])
    if events is None:
        return None
    actor = rng.choice(sorted({e.actor for e in events}))
    answer = where_is_actor(events, actor)
    return _story(
        "qa1",
        events,
        f"Where is {actor}?",
        answer,
        f"Answer: The most recent location of {actor} is the",
        LOCATIONS,
    )


def _qa2(rng: random.Random, n_facts: int) -> Story | None:
    events = _random_events(rng, n_facts, ACTORS, ["move", "move", "take", "drop"])
    if events is None:
        return None
    placed = sorted(simulate(events).object_at)
    if not placed:
        return None
    obj = rng.choice(placed)
    return _story(
        "qa2",
        events,
        f"Where is the {obj}?",
        where_is_object(events, obj),
        f"Answer: The {obj} is in the",
        LOCATIONS,
    )


def _qa3(rng: random.Random, n_facts: int) -> Story | None:
    events = _random_events(rng, n_facts, ACTORS, ["move", "move", "take", "take", "drop"])
    if events is None:
        return None
    paths = simulate(events).object_path
    options = [
        (obj, loc) for obj in sorted(paths) for loc in paths[obj][1:] if paths[obj].count(loc) == 1
    ]
    if not options:
        return None
    obj, location = rng.choice(options)
    return _story(
        "qa3",
        events,
        f"Where was the {obj} before the {location}?",
        where_before(events, obj, location),
        f"Answer: Before the {location}, the {obj} was in the",
        LOCATIONS,
    )


def _qa4(rng: random.Random, n_facts: int) -> Story | None:
    names = rng.sample(LOCATIONS, n_facts + 1)
    cells = {names[0]: (0, 0)}
    taken = {(0, 0)}
    events: list[Event] = []
    for name in names[1:]:
        options = [
            (anchor, d)
            for anchor in sorted(cells)
            for d, (dx, dy) in DIRECTIONS.items()
            if (cells[anchor][0] + dx, cells[anchor][1] + dy) not in taken
        ]
        anchor, d = rng.choice(options)
        dx, dy = DIRECTIONS[d]
        cells[name] = (cells[anchor][0] + dx, cells[anchor][1] + dy)
        taken.add(cells[name])
        if rng.random() < 0.5:
            events.append(Relation(name, d, anchor))
        else:
            events.append(Relation(anchor, OPPOSITE[d], name))
    fact = rng.choice(events)
    if rng.random() < 0.5:  # "What is north of the office?"
        question = f"What is {fact.direction} of the {fact.b}?"
        answer = fact.a
        prefix = f"Answer: The place {fact.direction} of the {fact.b} is the"
        check = related(events, fact.direction, of=fact.b)
    else:  # "What is the kitchen north of?"
        question = f"What is the {fact.a} {fact.direction} of?"
        answer = fact.b
        prefix = f"Answer: The {fact.a} is {fact.direction} of the"
        check = related(events, OPPOSITE[fact.direction], of=fact.a)
    if check != [answer]:
        return None
    return _story("qa4", events, question, answer, prefix, LOCATIONS)


def _qa5(rng: random.Random, n_facts: int) -> Story | None:
    kinds = ["move", "move", "take", "give", "give", "drop"]
    events = _random_events(rng, n_facts, GIVE_ACTORS, kinds)
    if events is None:
        return None
    gives = simulate(events).gives
    if not gives:
        return None
    g = gives[-1] if rng.random() < 0.5 else rng.choice(gives)
    forms = [
        (
            f"Who gave the {g.obj} to {g.receiver}?",
            g.giver,
            f"Answer: The {g.obj} was given to {g.receiver} by",
            give_answers(events, obj=g.obj, receiver=g.receiver),
        ),
        (
            f"What did {g.giver} give to {g.receiver}?",
            g.obj,
            f"Answer: {g.giver} gave {g.receiver} the",
            give_answers(events, giver=g.giver, receiver=g.receiver),
        ),
        (
            f"Who did {g.giver} give the {g.obj} to?",
            g.receiver,
            f"Answer: {g.giver} gave the {g.obj} to",
            give_answers(events, giver=g.giver, obj=g.obj),
        ),
    ]
    forms = [f for f in forms if f[3] == {f[1]}]  # keep only questions with one right answer
    if not forms:
        return None
    question, answer, prefix, _ = rng.choice(forms)
    return _story("qa5", events, question, answer, prefix, GIVE_ACTORS + OBJECTS)


_MAKERS: dict[str, tuple[Callable[[random.Random, int], Story | None], int, int]] = {
    "qa1": (_qa1, 6, 10),
    "qa2": (_qa2, 8, 14),
    "qa3": (_qa3, 10, 16),
    "qa4": (_qa4, 2, 4),
    "qa5": (_qa5, 8, 14),
}
BABI_TASKS: tuple[str, ...] = tuple(_MAKERS)


def make_story(task: str, rng: random.Random) -> Story:
    """Draw one self-consistent story for ``task`` (``"qa1"`` .. ``"qa5"``) from ``rng``."""
    maker, low, high = _MAKERS[task]
    for _ in range(1000):
        story = maker(rng, rng.randint(low, high))
        if story is not None:
            return story
    raise RuntimeError(f"could not draw a {task} story")  # pragma: no cover - never observed
