"""Policies that expose their plugins' parameters instead of declaring them again.

Most of a policy's hyperparameters belong to the plugins it composes: SnapKV's ``window`` and
``kernel`` are its scorer's, LASER-KV's ``alpha`` is its selector's. :func:`policy_with` builds a
:class:`~kvpress_lab.policy.Policy` base class whose attrs fields are copied from the plugin
classes' own attrs fields (default, validator, converter, type), so each parameter is declared
once, in the plugin, and a policy only says which plugins it exposes::

    @attrs.define(kw_only=True)
    class SnapKVPolicy(policy_with(SnapKVScorer, Expose(ObservationWindowBudgeter, share=("window",)))):
        name: ClassVar[str] = "snapkv"

        def compose(self) -> Composition:
            return Composition(
                budgeter=self.build(ObservationWindowBudgeter),
                scorers={"main": self.build(SnapKVScorer)},
                selector=TopKSelector(scorer="main", granularity="head"),
            )

The exposed fields are ordinary attrs fields of the policy: spec strings
(``snapkv:window=64,kernel=5``), ``kvlab plugins``, ``repr(policy)`` and ``policy.params()`` see
them like fields written by hand. :meth:`Policy.build <kvpress_lab.policy.Policy.build>` then
constructs a plugin from the policy's values.

Rules, applied when the class is created (a violation raises :class:`ConfigError` naming the
plugins and the fix):

- every init field of a plugin that has a default is exposed under its own name, unless
  ``only=`` leaves it out, ``fixed=`` sets it to a constant, or ``rename=`` gives it another
  policy name (LASER-KV exposes ``LSHScorer.n_bits`` as ``lsh_bits``); private fields are skipped;
- a plugin field named like a field of the :class:`~kvpress_lab.policy.Policy` base
  (``keep_ratio``, ``budget``, ...) is not declared again: the plugin reads the policy's value,
  whatever ``only=`` says (``fixed=`` overrides it), so a budgeter always takes the policy's
  budget;
- **name collisions are explicit**: when two exposed plugins have a field of the same policy name,
  the later one must list it in ``share=`` (it then reads the earlier plugin's parameter, whose
  default and validator the policy field has; the later plugin's own validator still runs when
  :meth:`~kvpress_lab.policy.Policy.build` constructs it) or ``rename=`` it; otherwise the class
  is not created;
- ``defaults=`` changes the default of any field of the new base (exposed or the Policy base's),
  keeping its validator; fields written in the policy's class body come after the exposed ones,
  and a body field with an exposed name replaces it (attrs inheritance).
"""

from __future__ import annotations

import sys
import types
import typing
from collections.abc import Mapping
from typing import Any

import attrs

from kvpress_lab.errors import ConfigError
from kvpress_lab.policy import Policy

__all__ = ["Expose", "policy_with"]


def _names(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    return (value,) if isinstance(value, str) else tuple(value)


@attrs.frozen(eq=False)
class Expose:
    """Which fields of ``plugin`` a policy exposes, and under which names.

    ``plugin`` is an attrs plugin class (scorer, selector, budgeter, or any attrs class the
    policy constructs, e.g. a decode evictor). ``only`` lists the plugin fields to expose
    (default: every init field with a default); ``rename`` maps a plugin field to its policy
    parameter name; ``share`` names policy parameters that an earlier exposed plugin declares
    and this one reads; ``fixed`` maps plugin fields to constants that ``build`` passes (not
    policy parameters).
    """

    plugin: type
    only: tuple[str, ...] | None = attrs.field(default=None, converter=_names)
    rename: Mapping[str, str] = attrs.field(factory=dict, converter=dict)
    share: tuple[str, ...] = attrs.field(default=(), converter=_names)
    fixed: Mapping[str, Any] = attrs.field(factory=dict, converter=dict)

    def __attrs_post_init__(self) -> None:
        who = getattr(self.plugin, "__name__", repr(self.plugin))
        if not attrs.has(self.plugin):
            raise ConfigError(f"Expose({who}): only attrs classes can expose their fields")
        fields = {f.name for f in attrs.fields(self.plugin) if f.init}
        for option, names in (
            ("only", self.only or ()),
            ("rename", self.rename),
            ("fixed", self.fixed),
        ):
            unknown = sorted(set(names) - fields)
            if unknown:
                raise ConfigError(
                    f"Expose({who}, {option}=...): {who} has no init field(s) {unknown}; "
                    f"its fields: {', '.join(sorted(fields))}"
                )

    def exposed(self) -> list[tuple[attrs.Attribute, str]]:
        """(plugin field, policy parameter name) for every field this exposure passes on."""
        out = []
        for f in attrs.fields(self.plugin):
            if not f.init or f.name.startswith("_") or f.name in self.fixed:
                continue
            if self.only is not None and f.name not in self.only:
                continue
            out.append((f, self.rename.get(f.name, f.name)))
        return out


def _type_hints(cls: type) -> dict[str, Any]:
    """The plugin's resolved field types; the declared ones (strings) where they do not resolve."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # e.g. an annotation naming a TYPE_CHECKING-only import
        return {f.name: f.type for f in attrs.fields(cls) if f.type is not None}


def _copy_field(f: attrs.Attribute, default: Any) -> Any:
    return attrs.field(
        default=default,
        validator=f.validator,
        converter=f.converter,
        repr=f.repr,
        eq=f.eq,
        order=f.order,
        hash=f.hash,
        init=f.init,
        metadata=f.metadata,
    )


def policy_with(
    *plugins: type | Expose,
    defaults: Mapping[str, Any] | None = None,
    base: type[Policy] = Policy,
) -> type[Policy]:
    """A ``base`` subclass whose attrs fields are the exposed fields of ``plugins``.

    Args:
        plugins: plugin classes (every field exposed) or :class:`Expose` entries, in the order
            their fields appear in the policy (after the base's own fields).
        defaults: policy parameter name -> new default (validators unchanged).
        base: the policy class to extend (default :class:`~kvpress_lab.policy.Policy`).
    Returns:
        An abstract attrs policy class to subclass with ``@attrs.define(kw_only=True)``; its
        ``exposed_plugins`` tells :meth:`~kvpress_lab.policy.Policy.build` which policy
        parameter feeds which plugin field.
    """
    base_fields = {f.name: f for f in attrs.fields(base)}
    base_hints = typing.get_type_hints(base)
    declared: dict[str, tuple[attrs.Attribute, Any, str]] = {}  # name -> (field, type, owner)
    exposed = dict(base.exposed_plugins)
    for item in plugins:
        exp = item if isinstance(item, Expose) else Expose(item)
        who = exp.plugin.__name__
        if exp.plugin in exposed:
            raise ConfigError(f"policy_with: {who} is exposed twice; expose each plugin once")
        hints = _type_hints(exp.plugin)
        earlier = set(declared)
        mapping: dict[str, str] = {}
        for f, name in exp.exposed():
            mapping[f.name] = name
            if name in base_fields:
                continue  # keep_ratio, budget, ...: the policy's own value
            if name in declared:
                if name not in exp.share:
                    raise ConfigError(
                        f"policy_with: parameter {name!r} is a field of both "
                        f"{declared[name][2]} and {who}; write Expose({who}, share=({name!r},)) "
                        f"to feed both from one parameter, or Expose({who}, rename=...) to give "
                        f"{who}'s its own name"
                    )
                continue
            if f.default is attrs.NOTHING:
                raise ConfigError(
                    f"policy_with: {who}.{f.name} has no default, so it cannot be a policy "
                    f"parameter; set it with Expose({who}, fixed=...) or leave it out with only="
                )
            declared[name] = (f, hints.get(f.name, f.type if f.type is not None else Any), who)
        stray = [s for s in exp.share if s not in mapping.values() or s not in earlier]
        if stray:
            raise ConfigError(
                f"policy_with: Expose({who}, share={stray}): no earlier plugin declares "
                f"{'these' if len(stray) > 1 else 'this'} parameter for {who} to share"
            )
        for f in attrs.fields(exp.plugin):  # the policy's budget reaches a plugin even past only=
            if f.init and f.name in base_fields and f.name not in exp.fixed:
                mapping.setdefault(f.name, f.name)
        exposed[exp.plugin] = (mapping, dict(exp.fixed))
    defaults = dict(defaults or {})
    unknown = sorted(set(defaults) - set(base_fields) - set(declared))
    if unknown:
        raise ConfigError(
            f"policy_with: defaults for unknown parameter(s) {unknown}; parameters: "
            f"{', '.join([*base_fields, *declared])}"
        )
    annotations: dict[str, Any] = {}
    namespace: dict[str, Any] = {}
    if set(defaults) & set(base_fields):  # re-declare the base's fields, in their order
        for name, f in base_fields.items():
            annotations[name] = base_hints.get(name, Any)
            namespace[name] = _copy_field(f, defaults.get(name, f.default))
    for name, (f, tp, _) in declared.items():
        annotations[name] = tp
        namespace[name] = _copy_field(f, defaults.get(name, f.default))
    title = ", ".join((p.plugin if isinstance(p, Expose) else p).__name__ for p in plugins)
    qualname = f"policy_with({title})"
    module = sys._getframe(1).f_globals.get("__name__", __name__)

    def body(ns: dict[str, Any]) -> None:
        ns.update(namespace)
        ns["__annotations__"] = annotations
        ns["__module__"] = module
        ns["__qualname__"] = qualname
        ns["exposed_plugins"] = types.MappingProxyType(exposed)

    cls = types.new_class(qualname, (base,), exec_body=body)
    return attrs.define(kw_only=True)(cls)
