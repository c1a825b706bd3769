"""The kvpress bridge: every NVIDIA kvpress ``ScorerPress`` as a kvpress-lab scorer.

NVIDIA kvpress (github.com/NVIDIA/kvpress) implements many KV-cache compression methods as
*presses*. A ``ScorerPress`` gives every cached token a score (``score(module, hidden_states,
keys, values, attentions, kwargs)`` -> [B, H, N]) and keeps the best ones; that score is all the
bridge takes. The budget, the protected slots and the selection stay kvpress-lab's, so a bridged
press is compared with every other policy at exactly the same number of kept tokens.

When kvpress is installed this plugin registers

* one scorer per scorer press, named ``kvpress.<Press>`` (``kvpress.SnapKVPress``), an attrs class
  generated from the press's dataclass fields: every constructor argument except
  ``compression_ratio`` is a typed parameter with kvpress's default, so ``kvlab plugins`` lists
  them and ``repr`` is the configuration;
* the policy ``kvpress``: ``press=<Press>`` scored per KV head, top-k over the context with nothing
  protected (kvpress's own ``ScorerPress.compress``), press parameters after ``/``::

      kvpress:keep_ratio=0.25,press=SnapKVPress/window_size=64/kernel_size=5

  and, nested in a policy that reuses another policy's scores (``+`` separates that level)::

      chunkkv:scorer=kvpress+press=ExpectedAttentionPress/n_sink=4

Presses that are not scorer presses, or whose score needs what the bridge never hands over (the
model for ``post_init_from_model``, eager attention weights), are declared unavailable with the
reason (hook ``kvlab_unavailable``). Without kvpress the plugin registers nothing and declares
``kvpress`` and ``kvpress.*`` unavailable, so ``kvlab plugins`` says why and nothing else breaks.

The press sees what it would see inside the model: the layer's attention module and forward
keyword arguments come from the model adapter (:meth:`ModelAdapter.attention_call`), the hidden
states, keys and values from the observation. ``attentions`` is always None.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Sequence
from types import MappingProxyType
from typing import Any, ClassVar, Literal

import attrs
import torch

from kvlab_plugins.sink_window import SinkWindowBudgeter
from kvlab_plugins.topk import TopKSelector
from kvpress_lab.errors import ConfigError, PluginError, UnknownPolicyError
from kvpress_lab.hookspecs import hookimpl
from kvpress_lab.interfaces import LayerObservation, Scorer, StepLayout
from kvpress_lab.params import policy_with
from kvpress_lab.policy import Composition, Policy
from kvpress_lab.registry import Component, PluginInfo, Registry, Unavailable

PREFIX = "kvpress."
"""Registered scorer names are ``PREFIX + press class name``."""
PARAM_SEPARATOR = "/"
"""Separates the press name and its parameters in the ``kvpress`` policy's ``press`` value."""
INSTALL_HINT = (
    "kvpress is not installed; install it (pip install kvpress; kvpress 0.5 needs "
    "transformers < 5.3) to bridge its scorer presses"
)
# a score that needs something no press receives from the bridge, by press class name
_NEEDS = MappingProxyType(
    {
        "ObservedAttentionPress": (
            "its score reads the full attention-weight matrix (eager attention), which "
            "kvpress-lab never materialises; use a press that recomputes what it needs"
        ),
    }
)


class BridgedScorer(Scorer):
    """Base of the generated ``kvpress.<Press>`` scorers: runs the press's ``score`` per layer."""

    press_class: ClassVar[type]

    def __attrs_post_init__(self) -> None:
        params = {f.name: getattr(self, f.name) for f in attrs.fields(type(self))}
        try:  # compression_ratio is unused: the press only scores, kvpress-lab selects
            self._press = self.press_class(compression_ratio=0.0, **params)
        except (AssertionError, ValueError, TypeError) as exc:
            raise ConfigError(
                f"{self.name}: kvpress refused the parameters {params}: {exc or type(exc).__name__}"
            ) from None

    def observe(self, obs: LayerObservation) -> torch.Tensor:
        module, kwargs = obs.adapter.attention_call(
            obs.layer_idx, obs.hidden, obs.positions, obs.n_past
        )
        try:
            scores = self._press.score(module, obs.hidden, obs.keys, obs.values, None, kwargs)
        except (AssertionError, NotImplementedError) as exc:
            raise PluginError(
                f"{self.name}: kvpress {self.press_class.__name__}.score refused this input "
                f"(layer {obs.layer_idx}, {obs.n_rows} rows over {obs.keys.shape[2]} keys): {exc}"
            ) from None
        expected = (obs.keys.shape[0], obs.keys.shape[1], obs.keys.shape[2])
        if tuple(scores.shape) != expected:
            raise PluginError(
                f"{self.name}: kvpress {self.press_class.__name__}.score returned shape "
                f"{tuple(scores.shape)}; expected [batch, kv_heads, keys] = {expected}"
            )
        return scores.sum(dim=0).float()  # [H, N]; the engine runs one sequence

    def score(
        self,
        layout: StepLayout,
        observed: Sequence[torch.Tensor | None],
        candidates: torch.Tensor,
        cache_keys: Callable[[int], torch.Tensor],
    ) -> torch.Tensor:
        return torch.stack(list(observed))  # [Ly, H, N]


@attrs.define(kw_only=True)
class BridgedPressPolicy(Policy):
    """Base of the per-press policies the ``kvpress`` policy builds (not registered); each one
    exposes its scorer's fields (:func:`kvpress_lab.params.policy_with`)."""

    scorer_class: ClassVar[type[BridgedScorer]]

    def compose(self) -> Composition:
        return Composition(
            budgeter=self.build(SinkWindowBudgeter),
            scorers={"main": self.build(self.scorer_class)},
            selector=TopKSelector(scorer="main", granularity="head"),
        )


# ------------------------------------------------------------------ generating the classes
_SIMPLE = (int, float, bool, str)


def _settable(tp: Any) -> bool:
    """Whether a spec string can set a field of type ``tp`` (what ``load_policy`` converts)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return all(isinstance(a, _SIMPLE) for a in typing.get_args(tp))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return bool(args) and all(_settable(a) for a in args)
    return tp in _SIMPLE


def _type_check(tp: Any) -> Callable[[Any, attrs.Attribute, Any], None]:
    """attrs validator: the value has the field's declared type (ConfigError otherwise)."""

    def ok(value: Any, t: Any) -> bool:
        origin = typing.get_origin(t)
        if origin is Literal:
            return value in typing.get_args(t)
        if typing.get_args(t) and origin is not Literal:
            return any(ok(value, a) for a in typing.get_args(t))
        if t is type(None):
            return value is None
        if t is float:
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        if t is int:
            return isinstance(value, int) and not isinstance(value, bool)
        return isinstance(value, t)

    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if not ok(value, tp):
            raise ConfigError(
                f"{instance.name}: {attribute.name}={value!r} is invalid: kvpress declares it "
                f"{_type_text(tp)}"
            )

    return check


def _type_text(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    args = typing.get_args(tp)
    if args:
        return " | ".join(_type_text(a) for a in args)
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _press_fields(press: type) -> tuple[list[tuple[str, Any, Any]], str | None]:
    """The press's settable constructor arguments (name, type, default), or why it has none."""
    try:
        hints = typing.get_type_hints(press)
    except Exception:  # unresolvable annotations: fall back to the raw ones
        hints = {}
    out = []
    for f in dataclasses.fields(press):
        if not f.init or f.name.startswith("_") or f.name == "compression_ratio":
            continue
        tp = hints.get(f.name, f.type)
        has_default = f.default is not dataclasses.MISSING
        if not has_default and f.default_factory is not dataclasses.MISSING:
            continue  # a container built per instance: kvpress's default is used
        if not _settable(tp):
            if has_default:
                continue  # an object parameter (tensor, module): kvpress's default is used
            return [], f"its required argument {f.name!r} ({tp}) cannot be written in a spec"
        if not has_default:
            return [], f"its argument {f.name!r} has no default"
        out.append((f.name, tp, f.default))
    return out, None


def _not_bridgeable(press: type, scorer_base: type, base_press: type) -> str | None:
    """Why ``press`` cannot be a scorer, or None."""
    if press is scorer_base:
        return "the abstract base of scorer presses; it scores nothing itself"
    if not issubclass(press, scorer_base):
        wrapped = [
            f.name
            for f in dataclasses.fields(press)
            if "Press" in str(f.type) and dataclasses.is_dataclass(press)
        ]
        if wrapped:
            return (
                f"not a ScorerPress: it wraps another press (field {wrapped[0]!r}) and keeps "
                "tokens its own way; wrap a bridged press with a kvpress-lab policy instead "
                "(e.g. chunkkv:scorer=kvpress+press=SnapKVPress)"
            )
        return (
            "not a ScorerPress: it decides what to drop itself (its own compress or forward "
            "hook), so there is no per-token score to bridge"
        )
    if press.__name__ in _NEEDS:
        return _NEEDS[press.__name__]
    if press.post_init_from_model is not base_press.post_init_from_model:
        return (
            "it needs post_init_from_model(model), which loads model-specific weights or "
            "statistics (often from the Hugging Face hub); the bridge never hands a press the "
            "model"
        )
    return None


def _scorer_class(press: type, fields: list[tuple[str, Any, Any]]) -> type[BridgedScorer]:
    first = (press.__doc__ or press.__name__).strip().splitlines()[0]
    cls = attrs.make_class(
        f"Kvpress{press.__name__}Scorer",
        {
            name: attrs.field(default=default, type=tp, validator=_type_check(tp))
            for name, tp, default in fields
        },
        bases=(BridgedScorer,),
        kw_only=True,
    )
    cls.name = PREFIX + press.__name__
    cls.press_class = press
    cls.__module__ = __name__
    cls.__doc__ = f"kvpress {press.__name__} scores: {first}"
    globals()[cls.__name__] = cls  # importable by name (pickling, repr round trips)
    return cls


def _policy_class(press: type, scorer: type[BridgedScorer]) -> type[BridgedPressPolicy]:
    base = policy_with(scorer, base=BridgedPressPolicy)
    cls = attrs.define(kw_only=True)(
        types.new_class(f"Kvpress{press.__name__}Policy", (base,), exec_body=_module_body)
    )
    cls.name = press.__name__
    cls.scorer_class = scorer
    globals()[cls.__name__] = cls
    return cls


def _module_body(namespace: dict[str, Any]) -> None:
    namespace["__module__"] = __name__


@attrs.frozen
class Bridge:
    """What the bridge found: scorer classes, per-press policies, and what it cannot bridge."""

    scorers: tuple[type[BridgedScorer], ...]
    press_registry: Registry  # per-press policies by press name, for the ``kvpress`` policy
    unavailable: tuple[tuple[str, str], ...]

    @property
    def available(self) -> bool:
        return bool(self.scorers)


_INFO = PluginInfo("kvpress_bridge", __name__, "kvpress-lab", "bridge")


def build_bridge() -> Bridge:
    """Inspect the installed kvpress (if any) and generate the bridged classes."""
    try:
        import kvpress
        from kvpress.presses.base_press import BasePress
        from kvpress.presses.scorer_press import ScorerPress
    except ImportError as exc:
        reason = f"{INSTALL_HINT} ({type(exc).__name__}: {exc})"
        empty = Registry(MappingProxyType({"policy": MappingProxyType({})}), (), ())
        return Bridge((), empty, (("kvpress", reason), (PREFIX + "*", reason)))
    scorers, policies, unavailable = [], {}, []
    for attr in sorted(dir(kvpress)):
        press = getattr(kvpress, attr)
        if not (isinstance(press, type) and issubclass(press, BasePress)) or press is BasePress:
            continue
        reason = _not_bridgeable(press, ScorerPress, BasePress)
        fields: list[tuple[str, Any, Any]] = []
        if reason is None:
            fields, reason = _press_fields(press)
        if reason is not None:
            unavailable.append((PREFIX + press.__name__, reason))
            continue
        scorer = _scorer_class(press, fields)
        scorers.append(scorer)
        policy = _policy_class(press, scorer)
        policies[policy.name] = Component("policy", policy.name, policy, _INFO)
    press_unavailable = tuple(
        Unavailable(name.removeprefix(PREFIX), why, _INFO) for name, why in unavailable
    )
    registry = Registry(
        MappingProxyType({"policy": MappingProxyType(policies)}), (_INFO,), (), press_unavailable
    )
    return Bridge(tuple(scorers), registry, tuple(unavailable))


@functools.cache
def bridge() -> Bridge:
    """The bridge of this process's kvpress, built once."""
    return build_bridge()


# ------------------------------------------------------------------ the ``kvpress`` policy
def _press_spec(press: str) -> str:
    """``"SnapKVPress/window_size=64"`` -> ``"SnapKVPress:window_size=64"``."""
    name, *params = (p.strip() for p in press.strip().split(PARAM_SEPARATOR))
    return name.removeprefix(PREFIX) + (":" + ",".join(params) if params else "")


def _check_press(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            f"kvpress: press={value!r} is invalid: name a kvpress scorer press, with its "
            "parameters after '/', e.g. press=SnapKVPress/window_size=64 (`kvlab plugins` lists "
            "the kvpress.* scorers and their parameters)"
        )


@attrs.define(kw_only=True)
class KvpressPolicy(Policy):
    """A kvpress scorer press (``press=SnapKVPress/window_size=64``): top-k per KV head, nothing
    protected, at kvpress-lab's budget."""

    name: ClassVar[str] = "kvpress"
    press: str = attrs.field(default="KnormPress", validator=_check_press)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._inner()  # unknown presses and bad parameters fail here, not mid-run

    def _inner(self) -> Policy:
        from kvpress_lab.spec import load_policy

        spec = _press_spec(self.press)
        if any(f"{p}=" in spec for p in ("keep_ratio", "budget")):
            raise ConfigError(
                f"kvpress: press={self.press!r} sets the budget; give keep_ratio or budget to "
                "the kvpress policy itself (kvpress:keep_ratio=0.25,press=...)"
            )
        budget = {"budget": self.budget} if self.budget is not None else {}
        try:
            return load_policy(
                spec,
                registry=bridge().press_registry,
                **(budget or {"keep_ratio": self.keep_ratio}),
            )
        except UnknownPolicyError as exc:
            raise UnknownPolicyError(f"kvpress: press={self.press!r}: {exc}") from None

    def compose(self) -> Composition:
        return self._inner().compose()


@hookimpl
def kvlab_scorers() -> list[type]:
    return list(bridge().scorers)


@hookimpl
def kvlab_policies() -> list[type]:
    return [KvpressPolicy] if bridge().available else []


@hookimpl
def kvlab_unavailable() -> list[tuple[str, str]]:
    return list(bridge().unavailable)
