"""Policy spec strings: ``NAME`` or ``NAME:param=value,param=value``.

Values are converted to each field's declared type (int, float, bool, str, a Literal's choices,
or None for optional fields); every mistake is reported naming the parameter, the value and what
is allowed.
"""

from __future__ import annotations

import difflib
import sys
import types
import typing
from typing import Any

import attrs

from kvpress_lab.errors import ConfigError
from kvpress_lab.policy import Policy
from kvpress_lab.registry import Registry, default_registry

__all__ = ["describe_parameters", "load_policy", "parse_spec"]

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"none", "null"}


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """Split ``NAME:a=1,b=2`` into ``("NAME", {"a": "1", "b": "2"})`` without converting values."""
    spec = spec.strip()
    if not spec:
        raise ConfigError(
            "empty policy spec: give NAME or NAME:param=value,... (e.g. snapkv:keep_ratio=0.25)"
        )
    name, _, rest = spec.partition(":")
    name = name.strip()
    params: dict[str, str] = {}
    if rest.strip():
        for item in rest.split(","):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ConfigError(
                    f"policy spec {spec!r}: {item.strip()!r} is not param=value "
                    "(write NAME:param=value,param=value)"
                )
            if key in params:
                raise ConfigError(f"policy spec {spec!r}: parameter {key!r} given twice")
            params[key] = value.strip()
    return name, params


def _field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations; where they do not resolve (a class defined in an exec'd namespace,
    a TYPE_CHECKING-only import), each attrs field's type on its own, or its declared string."""
    try:
        return typing.get_type_hints(cls)
    except Exception:
        if not attrs.has(cls):
            return {}
    out: dict[str, Any] = {}
    for f in attrs.fields(cls):
        tp = f.type
        if isinstance(tp, str):
            owner = next(
                (c for c in cls.__mro__ if f.name in vars(c).get("__annotations__", {})), cls
            )
            module = sys.modules.get(owner.__module__)
            shim = types.SimpleNamespace(__annotations__={f.name: tp})
            try:
                tp = typing.get_type_hints(shim, vars(module) if module else {})[f.name]
            except Exception:
                pass  # listed under its declared name; a spec string cannot set it
        out[f.name] = tp
    return out


def _convert(policy: str, field: str, raw: str, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and raw.lower() in _NONE:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(policy, field, raw, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{policy}: bad value {raw!r} for {field!r}")
    if origin is typing.Literal:
        for choice in args:
            if str(choice) == raw:
                return choice
        allowed = ", ".join(str(a) for a in args)
        raise ConfigError(f"{policy}: parameter {field!r} got {raw!r}; allowed values: {allowed}")
    if tp is bool:
        low = raw.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"{policy}: parameter {field!r} got {raw!r}; expected true or false")
    if tp is int:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(
                f"{policy}: parameter {field!r} got {raw!r}; expected an integer"
            ) from None
    if tp is float:
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(
                f"{policy}: parameter {field!r} got {raw!r}; expected a number"
            ) from None
    if tp is str:
        return raw
    raise ConfigError(
        f"{policy}: parameter {field!r} of type {tp} cannot be set from a spec string"
    )


def describe_parameters(cls: type) -> list[tuple[str, str, Any]]:
    """(name, type, default) for every hyperparameter of a plugin class.

    attrs classes list their fields; any other class its constructor's keyword parameters, so a
    plugin written without attrs is listed instead of breaking ``kvlab plugins``.
    """
    if not attrs.has(cls):
        return _init_parameters(cls)
    hints = _field_types(cls)
    out = []
    for f in attrs.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        default = f.default
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            default = default.factory()
        out.append((f.name, _type_name(hints.get(f.name, Any)), default))
    return out


def _init_parameters(cls: type) -> list[tuple[str, str, Any]]:
    import inspect

    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):  # builtins and odd metaclasses have no signature
        return []
    out = []
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name.startswith("_"):
            continue
        tp = p.annotation if p.annotation is not p.empty else Any
        default = p.default if p.default is not p.empty else None
        out.append((p.name, tp if isinstance(tp, str) else _type_name(tp), default))
    return out


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def load_policy(
    spec: str | Policy,
    registry: Registry | None = None,
    **overrides: Any,
) -> Policy:
    """Build a policy from a spec string (or return a policy object as it is).

    ``overrides`` (already typed values, e.g. ``keep_ratio=0.25``) apply on top of the spec, but a
    parameter written in the spec wins, so ``snapkv:keep_ratio=0.1`` keeps 0.1 in a sweep.
    Overrides naming a field the policy does not have, or cannot set (``full``'s fixed
    ``keep_ratio``), are skipped.
    """
    if isinstance(spec, Policy):
        settable = {f.name for f in attrs.fields(type(spec)) if f.init}
        overrides = {k: v for k, v in overrides.items() if k in settable}
        return attrs.evolve(spec, **overrides) if overrides else spec
    registry = registry or default_registry()
    name, raw = parse_spec(spec)
    cls = registry.policy_class(name)
    hints = _field_types(cls)
    fields = {f.name: f for f in attrs.fields(cls) if f.init}
    # overrides are sweep settings: a policy without such a (settable) field ignores them
    kwargs: dict[str, Any] = {k: v for k, v in overrides.items() if k not in raw and k in fields}
    for key, value in raw.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{name} has no parameter {key!r}.{hint} Parameters: {', '.join(sorted(fields))}"
            )
        kwargs[key] = _convert(name, key, value, hints[key])
    unknown = [k for k in kwargs if k not in fields]
    if unknown:
        raise ConfigError(
            f"{name} has no parameter(s) {unknown}; parameters: {', '.join(sorted(fields))}"
        )
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # attrs' built-in validators raise these
        raise ConfigError(f"{name}: {exc}") from None
