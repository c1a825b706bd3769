"""Policies: a named, typed configuration that composes a budgeter, scorers and a selector.

A policy class is an attrs class whose fields are its hyperparameters, with defaults, so
``repr(policy)`` is the complete configuration record. ``compose()`` turns it into the plugins
and engine options that the engine runs; the engine never looks at the policy's type.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, TypeVar

import attrs

from kvpress_lab.errors import ConfigError
from kvpress_lab.interfaces import Budgeter, Scorer, Selector

# the shared validators live in kvpress_lab.validators; re-exported here for existing imports
from kvpress_lab.validators import check_keep_ratio, positive_int

__all__ = [
    "Composition",
    "EngineOptions",
    "Policy",
    "budget_tokens",
    "check_keep_ratio",
    "positive_int",
]

PositionMode = Literal["original", "contiguous"]


T = TypeVar("T")


def budget_tokens(context_length: int, keep_ratio: float | None, budget: int | None) -> int:
    """Context tokens to keep: ``floor(keep_ratio * L)`` or ``budget``, at least 1, at most L.

    The small epsilon keeps ``0.3 * 10`` from flooring to 2 through float error.
    """
    if budget is not None:
        return max(1, min(context_length, budget))
    ratio = 1.0 if keep_ratio is None else keep_ratio
    return max(1, min(context_length, math.floor(ratio * context_length + 1e-9)))


@attrs.frozen
class EngineOptions:
    """How the engine runs a policy.

    block_size: None runs one-shot (prefill everything, then compress once); an integer runs
        block-wise prefill, compressing after every block so peak KV stays bounded.
    position_mode: "original" keeps every key at its original position; "contiguous" re-rotates
        the kept keys to positions 0..k-1 after every compression and continues after them.
    observation_window: rows observed by query-based scorers when the question is not visible
        (query-agnostic protocol).
    """

    block_size: int | None = attrs.field(default=None, validator=positive_int)
    position_mode: PositionMode = attrs.field(
        default="original", validator=attrs.validators.in_(("original", "contiguous"))
    )
    observation_window: int = attrs.field(default=64, validator=positive_int)


@attrs.frozen
class Composition:
    """The plugins a policy is made of, plus its engine options."""

    budgeter: Budgeter
    selector: Selector
    scorers: Mapping[str, Scorer] = attrs.field(factory=dict)
    engine: EngineOptions = attrs.field(factory=EngineOptions)
    # optional: ``start(lm, state)`` returns an object with ``after_forward(cache)`` (called after
    # every decode forward pass) and optionally ``close()`` (called when decoding ends)
    decode_evictor: Any = None

    def __attrs_post_init__(self) -> None:
        missing = [n for n in self.selector.scorer_names() if n not in self.scorers]
        if missing:
            raise ConfigError(
                f"selector {self.selector.name!r} reads scorer(s) {missing} that the policy does "
                f"not provide (it provides {sorted(self.scorers)})"
            )


@attrs.define(kw_only=True)
class Policy(ABC):
    """Base class of registered policies.

    Subclasses are ``@attrs.define(kw_only=True)`` classes with a ``name`` class variable and
    typed hyperparameter fields. ``keep_ratio`` (fraction of context tokens kept) and ``budget``
    (tokens kept) are the only budget settings; give at most one.
    """

    name: ClassVar[str]
    # plugin class -> ({plugin field: policy parameter}, {plugin field: constant}) for the
    # plugins whose parameters the policy exposes (set by kvpress_lab.params.policy_with)
    exposed_plugins: ClassVar[Mapping[type, tuple[Mapping[str, str], Mapping[str, Any]]]] = {}
    keep_ratio: float | None = attrs.field(default=0.5, validator=check_keep_ratio)
    budget: int | None = attrs.field(default=None, validator=positive_int)
    # generation-time compression (kvpress_lab.engine.generation): every ``decode_interval``
    # generated tokens the whole cache is compressed back to ``decode_budget`` tokens
    decode_interval: int | None = attrs.field(default=None, validator=positive_int)
    decode_budget: int | None = attrs.field(default=None, validator=positive_int)

    def __attrs_post_init__(self) -> None:
        # budget wins over a keep_ratio left at its default; two explicit budgets are ambiguous
        default_ratio = attrs.fields(type(self)).keep_ratio.default
        if self.budget is not None and self.keep_ratio != default_ratio:
            raise ConfigError(
                f"{self.name}: give keep_ratio or budget, not both "
                f"(got keep_ratio={self.keep_ratio}, budget={self.budget})"
            )
        if (self.decode_interval is None) != (self.decode_budget is None):
            raise ConfigError(
                f"{self.name}: decode_interval={self.decode_interval} and "
                f"decode_budget={self.decode_budget}: generation-time compression needs both "
                "(e.g. decode_interval=64,decode_budget=512) or neither"
            )

    def target_tokens(self, context_length: int) -> int:
        """Context tokens this policy's plain budget asks for."""
        return budget_tokens(context_length, self.keep_ratio, self.budget)

    @abstractmethod
    def compose(self) -> Composition:
        """Build the plugins this policy runs."""

    def build(self, plugin: type[T], **values: Any) -> T:
        """``plugin`` configured from this policy's parameters.

        Passes the parameters the policy exposes from ``plugin`` (see
        :func:`kvpress_lab.params.policy_with`) and, for a plugin it does not expose, the fields
        it shares with this base class (a budgeter's ``keep_ratio`` and ``budget``); ``values``
        go on top, e.g. ``self.build(SinkWindowBudgeter, sinks=self.n_sink)``.
        """
        entry = self.exposed_plugins.get(plugin)
        if entry is None:
            names = {f.name for f in attrs.fields(plugin) if f.init} if attrs.has(plugin) else ()
            shared = [f.name for f in attrs.fields(Policy) if f.name in names]
            entry = ({name: name for name in shared}, {})
        mapping, fixed = entry
        kwargs = {field: getattr(self, name) for field, name in mapping.items()}
        return plugin(**{**kwargs, **fixed, **values})

    def params(self) -> dict[str, Any]:
        """Resolved hyperparameters, for result records."""
        return attrs.asdict(self)
