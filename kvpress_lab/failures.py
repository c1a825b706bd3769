"""Which plugin failed: turning an exception raised while a policy ran into one clear line.

A policy runs code from up to four plugin kinds (the policy itself, its budgeter, its scorers and
its selector, plus an optional decode-time evictor), each possibly from another distribution. When
a run raises, :func:`attribute` walks the traceback for the innermost frame that belongs to one of
those components (a method called on it, or code in the module that defines it) and names it with
its distribution. :class:`~kvpress_lab.errors.PluginError` raised by the engine's own output
checks already starts with the component's kind and name; it is attributed from that.
"""

from __future__ import annotations

import inspect
import re
import traceback
from collections.abc import Iterator
from importlib import metadata

import attrs

from kvpress_lab.errors import PluginError

__all__ = ["PluginFailure", "attribute", "plugin_error"]

_FIX = "fix or update that plugin (or uninstall it), or choose another policy"
_ENGINE_CHECK = re.compile(r"^(scorer|selector|budgeter) '([^']*)'")


@attrs.frozen
class PluginFailure:
    """A failed component: its kind and name, the policy it ran in, where it comes from."""

    kind: str  # policy, budgeter, scorer, selector or decode evictor
    name: str
    policy: str
    distribution: str  # "name version", or a note that it is not installed as a distribution
    error: str  # one line: "RuntimeError: boom", or the engine's check message

    def message(self) -> str:
        where = f"{self.kind} {self.name!r} ({self.distribution}, in policy {self.policy!r})"
        return f"plugin failed: {where} {self.error}; {_FIX}"

    def to_dict(self) -> dict:
        return attrs.asdict(self)


def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def describe_exception(exc: BaseException) -> str:
    """``Type: first line of the message`` (the type alone when the message is empty)."""
    text = _one_line(str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _components(policy) -> Iterator[tuple[str, str, object]]:
    """(kind, name, object) of a policy and every plugin it is composed of."""
    yield "policy", getattr(policy, "name", type(policy).__name__), policy
    try:
        comp = policy.compose()
    except Exception:  # compose itself failing is attributed to the policy by its frames
        return
    yield "budgeter", comp.budgeter.name, comp.budgeter
    yield "selector", comp.selector.name, comp.selector
    for scorer in comp.scorers.values():
        yield "scorer", scorer.name, scorer
    if comp.decode_evictor is not None:
        evictor = comp.decode_evictor
        yield "decode evictor", getattr(evictor, "name", type(evictor).__name__), evictor


def _source_file(cls: type) -> str | None:
    try:
        return inspect.getsourcefile(cls)
    except (TypeError, OSError):
        return None


def distribution_of(cls: type, registry=None, policy_cls: type | None = None) -> str:
    """``"name version"`` of the installed distribution that ships ``cls``.

    Looked up in the registry (registered components), then by the top-level package, then,
    for a helper class defined beside its policy, as the policy's distribution.
    """
    if registry is not None:
        for table in registry.components.values():
            for comp in table.values():
                if comp.cls is cls:
                    return f"{comp.plugin.distribution} {comp.plugin.version}"
    top = cls.__module__.split(".")[0]
    dists = metadata.packages_distributions().get(top) or []
    if dists:
        try:
            return f"{dists[0]} {metadata.version(dists[0])}"
        except metadata.PackageNotFoundError:
            return dists[0]
    if policy_cls is not None and policy_cls is not cls and policy_cls.__module__ == cls.__module__:
        return distribution_of(policy_cls, registry)
    return f"module {cls.__module__}, not an installed distribution"


def attribute(exc: BaseException, policy, registry=None) -> PluginFailure | None:
    """The component of ``policy`` that ``exc`` came from, or None when no plugin is involved."""
    components = list(_components(policy))
    policy_name = components[0][1]

    def failure(kind: str, name: str, obj: object, error: str) -> PluginFailure:
        dist = distribution_of(type(obj), registry, type(policy))
        return PluginFailure(kind, name, policy_name, dist, error)

    if isinstance(exc, PluginError):
        m = _ENGINE_CHECK.match(str(exc))
        if m is not None:
            for kind, name, obj in components:
                if kind == m.group(1) and name == m.group(2):
                    return failure(kind, name, obj, _one_line(str(exc))[m.end() :].strip())
        kind, name, obj = components[0]
        return failure(kind, name, obj, "failed: " + _one_line(str(exc)))

    frames = [frame for frame, _ in traceback.walk_tb(exc.__traceback__)][::-1]  # innermost first
    by_type = {type(obj): (kind, name, obj) for kind, name, obj in components}  # plugins win
    for frame in frames:  # a method of a component: the most precise attribution
        hit = by_type.get(type(frame.f_locals.get("self")))
        if hit is not None:
            return failure(*hit, "raised " + describe_exception(exc))
    files = {}
    for kind, name, obj in components:  # later (plugin kinds) win over their policy
        path = _source_file(type(obj))
        if path is not None:
            files[path] = (kind, name, obj)
    for frame in frames:  # module-level code of a plugin
        hit = files.get(frame.f_code.co_filename)
        if hit is not None:
            return failure(*hit, "raised " + describe_exception(exc))
    return None


def plugin_error(exc: BaseException, policy, registry=None) -> PluginError | None:
    """A one-line :class:`PluginError` (exit status 3) for ``exc``, if a plugin caused it."""
    found = attribute(exc, policy, registry)
    return None if found is None else PluginError(found.message())
