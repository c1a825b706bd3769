"""Reuse a registered policy's scoring under another selector.

Some methods are not a scorer of their own but a different way of *selecting* over any scorer:
ChunkKV keeps whole chunks of tokens, AdaKV gives every head its own budget. Such a policy has a
``scorer`` field naming another registered policy; :func:`reuse_scoring` loads that policy through
the public spec API at the same budget and hands back its budgeter, its scorers, the name of the
one scorer its selector reads and its engine options, so the wrapping policy only brings its
selector.

The field's value is a *nested spec*: the inner policy's name, then its parameters joined by
``+`` (the outer spec already uses ``,`` and ``:``)::

    chunkkv:keep_ratio=0.25,scorer=snapkv+window=64+kernel=5+pooling=avg

The inner spec never carries ``keep_ratio`` or ``budget``: the wrapping policy's budget is the one
budget, handed to the inner policy, so both ask for the same number of tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from kvpress_lab.errors import ConfigError
from kvpress_lab.interfaces import Budgeter, Scorer, Selector
from kvpress_lab.policy import Composition, EngineOptions, Policy

__all__ = ["NESTED_SEPARATOR", "ReusedScoring", "ReusesScoring", "nested_spec", "reuse_scoring"]

NESTED_SEPARATOR = "+"
"""Separates the inner policy's name and parameters inside a nested spec."""

_BUDGET_FIELDS = ("keep_ratio", "budget")


def nested_spec(text: str) -> str:
    """``"snapkv+window=64+kernel=5"`` -> ``"snapkv:window=64,kernel=5"`` (a plain policy spec)."""
    name, *params = (part.strip() for part in text.strip().split(NESTED_SEPARATOR))
    return name + (":" + ",".join(params) if params else "")


@attrs.frozen
class ReusedScoring:
    """The scoring half of a registered policy, composed at the wrapping policy's budget."""

    policy: Policy
    budgeter: Budgeter
    scorers: Mapping[str, Scorer]
    scorer: str  # the scorer the inner policy's selector reads
    engine: EngineOptions

    def compose(self, selector: Selector, extra_scorers: Mapping[str, Scorer] | None = None):
        """A :class:`Composition` of the inner budgeter and scorers with ``selector``."""
        scorers = dict(self.scorers)
        for name, scorer in (extra_scorers or {}).items():
            if name in scorers:
                raise ConfigError(
                    f"policy {self.policy.name!r} already has a scorer named {name!r}; the "
                    "wrapping policy must name its own scorers differently"
                )
            scorers[name] = scorer
        return Composition(
            budgeter=self.budgeter, selector=selector, scorers=scorers, engine=self.engine
        )


def reuse_scoring(
    text: str,
    *,
    keep_ratio: float | None,
    budget: int | None,
    owner: str,
    field: str = "scorer",
    registry: Any = None,
) -> ReusedScoring:
    """Load the policy named by nested spec ``text`` at this budget and take its scoring apart.

    ``owner`` and ``field`` name the wrapping policy and its field, for error messages. Raises
    :class:`ConfigError` when the spec is malformed, sets a budget itself, names a policy that
    cannot take the budget, or whose selector does not read exactly one scorer.
    """
    from kvpress_lab.spec import load_policy, parse_spec  # spec imports the registry

    if not isinstance(text, str) or not text.strip():
        raise ConfigError(
            f"{owner}: {field}={text!r} is invalid: name a registered policy whose scores to "
            f"reuse, e.g. {field}=snapkv or {field}=snapkv+window=64+kernel=5"
        )
    spec = nested_spec(text)
    name, params = parse_spec(spec)
    fixed = [p for p in _BUDGET_FIELDS if p in params]
    if fixed:
        raise ConfigError(
            f"{owner}: {field}={text!r} sets {', '.join(fixed)}; the budget belongs to {owner} "
            f"itself (write {owner}:keep_ratio=...,{field}={name})"
        )
    overrides = {"budget": budget} if budget is not None else {"keep_ratio": keep_ratio}
    inner = load_policy(spec, registry=registry, **overrides)
    if (inner.keep_ratio, inner.budget) != (
        overrides.get("keep_ratio", inner.keep_ratio),
        overrides.get("budget", inner.budget),
    ):
        raise ConfigError(
            f"{owner}: {field}={name!r} does not take the budget {overrides} (it keeps "
            f"keep_ratio={inner.keep_ratio}, budget={inner.budget}); name a policy whose budget "
            "can be set"
        )
    comp = inner.compose()
    read = tuple(comp.selector.scorer_names())
    if len(read) != 1:
        raise ConfigError(
            f"{owner}: {field}={name!r} selects with {comp.selector.name!r}, which reads "
            f"{len(read)} scorers {list(read)}; {owner} reuses policies whose selector reads "
            "exactly one scorer"
        )
    return ReusedScoring(
        policy=inner,
        budgeter=comp.budgeter,
        scorers=dict(comp.scorers),
        scorer=read[0],
        engine=comp.engine,
    )


class ReusesScoring:
    """Mixin for a policy whose ``scorer`` field names the registered policy it scores with.

    Subclasses declare ``scorer: str`` (and ``keep_ratio``/``budget``); a bad ``scorer`` spec
    fails when the policy is built, not mid-run.
    """

    __slots__ = ()

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.reused_scoring()

    def reused_scoring(self) -> ReusedScoring:
        return reuse_scoring(
            self.scorer, keep_ratio=self.keep_ratio, budget=self.budget, owner=self.name
        )
