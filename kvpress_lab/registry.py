"""Plugin discovery through entry points, and the registry of what was found.

Entry points in the ``kvpress_lab`` group are the only discovery path; first-party plugins are
found the same way. A plugin that fails to import, implements an unknown hook, returns something
that is not a plugin class, or registers a name already taken is recorded as a
:class:`PluginProblem` and skipped; everything else keeps working.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
from collections.abc import Iterable, Mapping
from importlib import metadata
from types import MappingProxyType, ModuleType

import attrs
import pluggy

from kvpress_lab import hookspecs
from kvpress_lab.errors import UnknownPolicyError
from kvpress_lab.interfaces import Budgeter, Scorer, Selector
from kvpress_lab.policy import Policy

ENTRY_POINT_GROUP = "kvpress_lab"
FIRST_PARTY = "kvpress-lab"

# kind -> (hook name, required base class)
KINDS: Mapping[str, tuple[str, type]] = MappingProxyType(
    {
        "policy": ("kvlab_policies", Policy),
        "scorer": ("kvlab_scorers", Scorer),
        "selector": ("kvlab_selectors", Selector),
        "budgeter": ("kvlab_budgeters", Budgeter),
    }
)


@attrs.frozen
class PluginInfo:
    """One entry point: the plugin's name, module and the distribution that ships it."""

    name: str
    module: str
    distribution: str
    version: str


@attrs.frozen
class Component:
    """A registered class of one kind (policy, scorer, selector or budgeter)."""

    kind: str
    name: str
    cls: type
    plugin: PluginInfo


@attrs.frozen
class PluginProblem:
    """A plugin, or one of its components, that could not be registered."""

    plugin: str
    distribution: str
    error: str

    def __str__(self) -> str:
        return f"plugin {self.plugin!r} from {self.distribution}: {self.error}"


@attrs.frozen
class Unavailable:
    """A component (or a glob of names) a plugin cannot provide here, and why."""

    name: str
    reason: str
    plugin: PluginInfo

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.name)


@attrs.frozen
class Registry:
    """What discovery found: components by kind and name, the problems it met, and what the
    installed plugins declared unavailable (hook ``kvlab_unavailable``)."""

    components: Mapping[str, Mapping[str, Component]]
    plugins: tuple[PluginInfo, ...]
    problems: tuple[PluginProblem, ...]
    unavailable: tuple[Unavailable, ...] = ()

    def names(self, kind: str) -> list[str]:
        return sorted(self.components.get(kind, {}))

    def get(self, kind: str, name: str) -> Component:
        table = self.components.get(kind, {})
        if name in table:
            return table[name]
        for entry in self.unavailable:
            if entry.matches(name):
                raise UnknownPolicyError(
                    f"{kind} {name!r} is not available: {entry.reason} (plugin "
                    f"{entry.plugin.name!r} from {entry.plugin.distribution}; `kvlab plugins` "
                    "lists what is unavailable and why)"
                )
        broken = self._broken(name)
        if broken is not None:
            raise UnknownPolicyError(
                f"{kind} {name!r} is not available: plugin {broken.plugin!r} from "
                f"{broken.distribution} failed to load ({broken.error}); fix or reinstall "
                f"{broken.distribution} (`kvlab plugins` lists broken plugins)"
            )
        available = sorted(table)
        close = difflib.get_close_matches(name, available, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        skipped = (
            f"; {len(self.problems)} plugin(s) failed to load and were skipped"
            if self.problems
            else ""
        )
        raise UnknownPolicyError(
            f"unknown {kind} {name!r}.{hint} Available {kind} names: {', '.join(available) or 'none'}"
            f" (run `kvlab plugins` to list them with their parameters{skipped})"
        )

    def _broken(self, name: str) -> PluginProblem | None:
        """The load failure that most likely hid ``name``: a plugin (entry point) of that name,
        or a distribution named after it (``kvlab-NAME``, ``NAME``)."""
        wanted = _normalize(name)
        for problem in self.problems:
            if _normalize(problem.plugin) == wanted:
                return problem
        for problem in self.problems:
            dist = _normalize(problem.distribution)
            if dist == wanted or dist.removeprefix("kvlab-") == wanted:
                return problem
        return None

    def policy_class(self, name: str) -> type[Policy]:
        return self.get("policy", name).cls


def _entry_points() -> list[metadata.EntryPoint]:
    eps = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
    # deterministic order, first-party first, so a clash always keeps the first-party component
    return sorted(eps, key=lambda ep: (_dist_name(ep) != FIRST_PARTY, _dist_name(ep), ep.name))


def _dist_name(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.metadata["Name"] if dist is not None else "unknown distribution"


def _dist_version(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.version if dist is not None else "unknown"


def discover(entry_points: Iterable[metadata.EntryPoint] | None = None) -> Registry:
    """Load every plugin of the ``kvpress_lab`` entry-point group into a new registry."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    problems: list[PluginProblem] = []
    loaded: list[tuple[PluginInfo, ModuleType]] = []
    for ep in entry_points if entry_points is not None else _entry_points():
        info = PluginInfo(ep.name, ep.value, _dist_name(ep), _dist_version(ep))
        module = None
        try:
            module = ep.load()
            pm.register(module, name=f"{info.distribution}:{ep.name}")
            pm.check_pending()
        except Exception as exc:  # a broken plugin must not break the others
            if module is not None and pm.is_registered(module):
                pm.unregister(module)
            problems.append(PluginProblem(ep.name, info.distribution, _describe(exc)))
            continue
        loaded.append((info, module))

    components: dict[str, dict[str, Component]] = {kind: {} for kind in KINDS}
    unavailable: list[Unavailable] = []
    for info, module in loaded:
        entries, problem = _unavailable(info, module)
        unavailable.extend(entries)
        if problem is not None:
            problems.append(problem)
        for kind, (hook_name, base) in KINDS.items():
            impl = getattr(module, hook_name, None)
            if impl is None:
                continue
            try:
                classes = list(impl() or [])
            except Exception as exc:
                problems.append(
                    PluginProblem(
                        info.name, info.distribution, f"{hook_name}() failed: {_describe(exc)}"
                    )
                )
                continue
            for cls in classes:
                problem = _check_component(kind, base, cls)
                if problem is None and cls.name in components[kind]:
                    other = components[kind][cls.name].plugin
                    problem = (
                        f"{kind} name {cls.name!r} is already registered by plugin "
                        f"{other.name!r} ({other.distribution}); rename it"
                    )
                if problem is not None:
                    problems.append(PluginProblem(info.name, info.distribution, problem))
                    continue
                components[kind][cls.name] = Component(kind, cls.name, cls, info)
    frozen = MappingProxyType({k: MappingProxyType(v) for k, v in components.items()})
    return Registry(frozen, tuple(i for i, _ in loaded), tuple(problems), tuple(unavailable))


def _unavailable(
    info: PluginInfo, module: ModuleType
) -> tuple[list[Unavailable], PluginProblem | None]:
    """The ``(name, reason)`` pairs of a plugin's ``kvlab_unavailable`` hook, checked."""
    impl = getattr(module, "kvlab_unavailable", None)
    if impl is None:
        return [], None
    try:
        entries = list(impl() or [])
    except Exception as exc:
        return [], PluginProblem(
            info.name, info.distribution, f"kvlab_unavailable() failed: {_describe(exc)}"
        )
    out = []
    for entry in entries:
        if (
            not isinstance(entry, tuple)
            or len(entry) != 2
            or not all(isinstance(x, str) and x for x in entry)
        ):
            return out, PluginProblem(
                info.name,
                info.distribution,
                f"kvlab_unavailable() returned {entry!r}; expected (name, reason) string pairs",
            )
        out.append(Unavailable(entry[0], entry[1], info))
    return out, None


def _check_component(kind: str, base: type, cls: object) -> str | None:
    if not isinstance(cls, type) or not issubclass(cls, base):
        return f"{kind} hook returned {cls!r}, which is not a subclass of {base.__module__}.{base.__name__}"
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        return f"{kind} class {cls.__qualname__} has no `name` class attribute"
    return None


def _normalize(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@functools.cache
def default_registry() -> Registry:
    """The registry of the installed plugins, discovered once per process."""
    return discover()
