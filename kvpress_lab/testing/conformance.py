"""The plugin conformance suite: does a policy honour the contract every policy must keep?

Run it against your own policy from a test::

    from kvpress_lab.testing.conformance import check_policy

    def test_my_policy_conforms():
        check_policy("keynorm")          # raises ConformanceError listing every failed check

or one pytest test per check, so a failure names the check::

    import pytest
    from kvpress_lab.testing.conformance import conformance_cases, run_check

    @pytest.mark.parametrize(("policy", "check"), conformance_cases(["keynorm"]))
    def test_conformance(policy, check):
        run_check(policy, check)

The checks run on a tiny random model (:func:`kvpress_lab.testing.tiny_model`), so the whole suite
takes about a second per policy on a CPU:

``registered``
    the policy is found through the ``kvpress_lab`` entry-point group, subclasses
    :class:`~kvpress_lab.policy.Policy` and its registered name is its ``name``.
``fields``
    it is an attrs class and every hyperparameter has a default, so ``cls()`` works.
``spec_roundtrip``
    a spec string written from its parameters rebuilds an equal policy with the same ``repr``.
``budget``
    it ends with the tokens its ``keep_ratio`` / ``budget`` asks for (within 1 %), in both the
    question-aware and the query-agnostic protocol, and its budgeter reports that target.
``determinism``
    two runs with the same settings keep the same indices, even when torch's global seed differs
    (random choices must come from a generator seeded by the policy's parameters).
``shapes``
    kept indices are ``[layers, kv_heads, k]``, strictly increasing and inside the context.
``edge_cases``
    a context shorter than the budget is kept whole, a very short context and a single-token
    question work, and ``keep_ratio=1`` keeps everything and answers exactly like ``full``.
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
import torch

from kvpress_lab.errors import ConfigError
from kvpress_lab.models import LoadedModel
from kvpress_lab.policy import Policy, budget_tokens
from kvpress_lab.prompt import PromptSegments, build_prompt
from kvpress_lab.registry import Registry, default_registry

__all__ = [
    "CHECKS",
    "ConformanceError",
    "check_policy",
    "conformance_cases",
    "run_check",
    "spec_string",
]

KEEP_RATIO = 0.25
"""keep_ratio used by the budget checks."""
TOLERANCE = 0.01
"""Largest relative difference allowed between kept tokens and the target (fairness rule)."""
CONTEXT = (
    "Mara keeps bees behind the old mill. The pass key is 4721. Tom fixed the red bicycle on "
    "Tuesday. Rain fell over the harbour while the ferry waited. The lantern in the tower was "
    "green. Ilse wrote three letters to her brother in Oslo and sent none of them. "
)
QUESTION = "What is the pass key?"
ANSWER_PREFIX = "The pass key is"
MAX_NEW_TOKENS = 4


class ConformanceError(AssertionError):
    """A policy broke the plugin contract; the message lists every failed check."""


class _Failure(AssertionError):
    pass


@attrs.frozen
class _Subject:
    name: str
    cls: type
    registry: Registry
    lm: LoadedModel
    given_class: bool


@functools.cache
def _default_lm() -> LoadedModel:
    from kvpress_lab.testing.tiny import tiny_model

    return tiny_model("llama", seed=0, layers=2, heads=4, kv_heads=2)


def _init_fields(cls: type) -> dict[str, attrs.Attribute]:
    return {f.name: f for f in attrs.fields(cls) if f.init}


def spec_string(policy: Policy) -> str:
    """The spec string ``NAME:param=value,...`` that rebuilds ``policy`` with ``load_policy``.

    Parameters whose values cannot be written in a spec (lists, objects) are left out.
    """
    items = []
    for name in _init_fields(type(policy)):
        if name.startswith("_"):
            continue
        value = getattr(policy, name)
        text = _spec_value(value)
        if text is not None:
            items.append(f"{name}={text}")
    return policy.name + (":" + ",".join(items) if items else "")


def _spec_value(value: Any) -> str | None:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        text = repr(value) if isinstance(value, float) else str(value)
        if isinstance(value, str) and ("," in text or "=" in text):
            return None
        return text
    return None


def _fail(subject: _Subject, message: str) -> typing.NoReturn:
    raise _Failure(message)


def _build(subject: _Subject, **kwargs: Any) -> Policy:
    try:
        return subject.cls(**kwargs)
    except ConfigError as exc:
        _fail(subject, f"{subject.cls.__qualname__}(**{kwargs}) raised ConfigError: {exc}")


def _with_budget(subject: _Subject, keep_ratio: float | None = None, budget: int | None = None):
    """Policy instance at a budget, or None when the policy does not expose that setting."""
    fields = _init_fields(subject.cls)
    if budget is not None:
        return _build(subject, budget=budget) if "budget" in fields else None
    if "keep_ratio" not in fields:
        return None
    return _build(subject, keep_ratio=keep_ratio)


def _segments(lm: LoadedModel, context: str = CONTEXT, question: str = QUESTION) -> PromptSegments:
    return build_prompt(lm.tokenizer, context, question, ANSWER_PREFIX)


def _run(
    subject: _Subject, policy: Policy, segments: PromptSegments, global_seed: int = 0, **kwargs: Any
):
    from kvpress_lab.engine.api import run_segments

    key = (
        id(subject.lm),
        type(policy),
        repr(policy),
        tuple(segments.context_ids.tolist()),
        tuple(segments.question_ids.tolist()),
        global_seed,
        tuple(sorted(kwargs.items())),
    )
    if key in _RUNS:
        return _RUNS[key]
    try:
        policy.compose().budgeter.validate(segments.context_length)
        torch.manual_seed(global_seed)
        result = run_segments(subject.lm, policy, segments, max_new_tokens=MAX_NEW_TOKENS, **kwargs)
    except _Failure:
        raise
    except Exception as exc:
        _fail(
            subject,
            f"running {policy!r} on a {segments.context_length}-token context "
            f"({segments.question_length}-token question{_kw(kwargs)}) raised "
            f"{type(exc).__name__}: {exc}",
        )
    if len(_RUNS) >= 256:
        _RUNS.clear()
    _RUNS[key] = result
    return result


# runs shared between the checks of one policy (the same run is never repeated)
_RUNS: dict[tuple, Any] = {}


def _kw(kwargs: dict) -> str:
    return "".join(f", {k}={v}" for k, v in kwargs.items())


# --------------------------------------------------------------------------- checks


def check_registered(subject: _Subject) -> None:
    table = subject.registry.components.get("policy", {})
    if subject.name not in table:
        _fail(subject, _not_registered(subject.name, subject.registry))
    registered = table[subject.name].cls
    if subject.given_class and registered is not subject.cls:
        _fail(
            subject,
            f"the policy registered as {subject.name!r} is {registered.__module__}."
            f"{registered.__qualname__}, not the class under test "
            f"{subject.cls.__module__}.{subject.cls.__qualname__}",
        )
    if not issubclass(registered, Policy):
        _fail(subject, f"{registered!r} does not subclass kvpress_lab.policy.Policy")
    if getattr(registered, "name", None) != subject.name:
        _fail(
            subject,
            f"class attribute name={getattr(registered, 'name', None)!r} differs from the "
            f"registered name {subject.name!r}",
        )


def _not_registered(name: str, registry: Registry) -> str:
    problems = [str(p) for p in registry.problems]
    hint = f" Plugins that failed to load: {'; '.join(problems)}." if problems else ""
    known = ", ".join(registry.names("policy")) or "none"
    return (
        f"no policy named {name!r} is registered (registered: {known}). Declare the plugin "
        "module in your pyproject.toml under [project.entry-points.kvpress_lab] (e.g. "
        f'{name} = "my_package.my_module"), implement the kvlab_policies hook with @hookimpl, '
        "and reinstall the distribution." + hint
    )


def check_fields(subject: _Subject) -> None:
    cls = subject.cls
    if not attrs.has(cls):
        _fail(
            subject,
            f"{cls.__qualname__} is not an attrs class; decorate it with @attrs.define(kw_only=True)",
        )
    missing = [f.name for f in attrs.fields(cls) if f.init and f.default is attrs.NOTHING]
    if missing:
        _fail(
            subject,
            f"hyperparameter(s) {missing} have no default; every policy field needs one so "
            f"`{subject.name}` works as a spec string on its own",
        )
    try:
        policy = cls()
    except Exception as exc:
        _fail(subject, f"{cls.__qualname__}() with all defaults raised {type(exc).__name__}: {exc}")
    if not isinstance(policy.params(), dict):
        _fail(subject, "params() must return a dict of the resolved hyperparameters")


def check_spec_roundtrip(subject: _Subject) -> None:
    from kvpress_lab.spec import load_policy

    variants = [subject.cls()]
    if "keep_ratio" in _init_fields(subject.cls):
        variants.append(_build(subject, keep_ratio=0.3))
    for policy in variants:
        spec = spec_string(policy)
        try:
            again = load_policy(spec, registry=subject.registry)
        except Exception as exc:
            _fail(
                subject,
                f"the spec string {spec!r} written from {policy!r} does not load: "
                f"{type(exc).__name__}: {exc}",
            )
        if type(again) is not type(policy) or again != policy or repr(again) != repr(policy):
            _fail(
                subject,
                f"the spec string {spec!r} rebuilds {again!r}, not {policy!r}; every field must "
                "be settable from a spec string and compare equal after the round trip",
            )


def _expect_kept(subject: _Subject, what: str, result, expected: int) -> None:
    kept = result.kept_tokens
    slack = max(TOLERANCE * expected, 0.5)
    if abs(kept - expected) > slack:
        _fail(
            subject,
            f"{what}: kept {kept:g} of {result.context_tokens} context tokens per layer/head, but "
            f"the budget asks for {expected} (allowed difference 1%). Every policy must end with "
            "the budget it was given so comparisons stay fair.",
        )
    if abs(result.target_tokens - expected) > slack:
        _fail(
            subject,
            f"{what}: the budgeter's target_tokens() reports {result.target_tokens}, but the budget "
            f"is {expected} tokens",
        )


def check_budget(subject: _Subject) -> None:
    seg = _segments(subject.lm)
    n = seg.context_length
    policy = _with_budget(subject, keep_ratio=KEEP_RATIO)
    if policy is None:  # fixed-budget policies (e.g. full): the target is their own
        policy = subject.cls()
        result = _run(subject, policy, seg)
        _expect_kept(subject, f"{policy!r}", result, policy.target_tokens(n))
        return
    expected = budget_tokens(n, KEEP_RATIO, None)
    _expect_kept(subject, f"{policy!r}", _run(subject, policy, seg), expected)
    result = _run(subject, policy, seg, query_agnostic=True)
    _expect_kept(subject, f"{policy!r} (query-agnostic)", result, expected)
    tokens = n // 3
    by_tokens = _with_budget(subject, budget=tokens)
    if by_tokens is not None:
        _expect_kept(subject, f"{by_tokens!r}", _run(subject, by_tokens, seg), tokens)


def check_determinism(subject: _Subject) -> None:
    seg = _segments(subject.lm)
    policy = _with_budget(subject, keep_ratio=KEEP_RATIO) or subject.cls()
    first = _run(subject, policy, seg)
    # a different global torch seed: a policy's choices may depend on its own parameters only
    second = _run(subject, type(policy)(**_init_kwargs(policy)), seg, global_seed=1)
    if not torch.equal(first.kept_indices, second.kept_indices):
        diff = (first.kept_indices != second.kept_indices).nonzero()
        where = tuple(diff[0].tolist()) if diff.numel() else "shape"
        _fail(
            subject,
            f"two runs of {policy!r} on the same input kept different indices (first difference "
            f"at [layer, head, slot]={where}); seed every random choice from the policy's "
            "parameters",
        )
    if first.answer_token_ids != second.answer_token_ids:
        _fail(subject, f"two runs of {policy!r} gave different answers")


def _init_kwargs(policy: Policy) -> dict[str, Any]:
    return {name: getattr(policy, name) for name in _init_fields(type(policy))}


def _check_indices(subject: _Subject, what: str, result) -> None:
    idx = result.kept_indices
    cfg = subject.lm.model.config
    layers = cfg.num_hidden_layers
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    if idx.dim() != 3 or tuple(idx.shape[:2]) != (layers, heads):
        _fail(
            subject,
            f"{what}: kept_indices has shape {tuple(idx.shape)}; expected [layers={layers}, "
            f"kv_heads={heads}, k]",
        )
    if idx.dtype != torch.long:
        _fail(subject, f"{what}: kept_indices has dtype {idx.dtype}; expected torch.long")
    n = result.context_tokens
    # rows of a ragged result (per-layer / per-head counts) hold their count, then -1 padding
    held = torch.arange(idx.shape[-1]) < result.row_counts[..., None]
    if not bool((idx[~held] == -1).all()):
        _fail(subject, f"{what}: kept_indices padding after a row's kept_counts is not -1")
    real = idx[held]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= n):
        _fail(
            subject,
            f"{what}: kept_indices range over [{int(real.min())}, {int(real.max())}], outside "
            f"the context [0, {n - 1}]",
        )
    rising = (idx[..., 1:] > idx[..., :-1]) | ~held[..., 1:]
    if idx.shape[-1] > 1 and not bool(rising.all()):
        _fail(
            subject,
            f"{what}: kept_indices are not strictly increasing in every row (unsorted or "
            "duplicated slots)",
        )


def check_shapes(subject: _Subject) -> None:
    seg = _segments(subject.lm)
    policy = _with_budget(subject, keep_ratio=KEEP_RATIO) or subject.cls()
    _check_indices(subject, f"{policy!r}", _run(subject, policy, seg))


def check_edge_cases(subject: _Subject) -> None:
    lm = subject.lm
    seg = _segments(lm)
    n = seg.context_length

    # a context shorter than the budget is kept whole
    big = _with_budget(subject, budget=2 * n)
    if big is not None:
        result = _run(subject, big, seg)
        _check_indices(subject, f"{big!r}", result)
        if result.kept_tokens != n:
            _fail(
                subject,
                f"{big!r} on a {n}-token context kept {result.kept_tokens:g} tokens; a context "
                "shorter than the budget must be kept whole",
            )

    # a very short context
    short = _segments(lm, context="Hi.")
    policy = _with_budget(subject, keep_ratio=0.5) or subject.cls()
    result = _run(subject, policy, short)
    _check_indices(subject, f"{policy!r} on a {short.context_length}-token context", result)
    expected = policy.target_tokens(short.context_length)
    if abs(result.kept_tokens - expected) > 0.5:
        _fail(
            subject,
            f"{policy!r} on a {short.context_length}-token context kept "
            f"{result.kept_tokens:g} tokens; expected {expected}",
        )

    # a single-token question
    one = PromptSegments(seg.context_ids, seg.question_ids[-1:].clone())
    policy = _with_budget(subject, keep_ratio=KEEP_RATIO) or subject.cls()
    result = _run(subject, policy, one)
    _check_indices(subject, f"{policy!r} with a single-token question", result)
    _expect_kept(
        subject, f"{policy!r} with a single-token question", result, policy.target_tokens(n)
    )

    # keep_ratio=1 keeps everything and answers like full
    whole = _with_budget(subject, keep_ratio=1.0)
    if whole is None:
        return
    result = _run(subject, whole, seg)
    everything = torch.arange(n).expand_as(result.kept_indices)
    if result.kept_indices.shape[-1] != n or not torch.equal(result.kept_indices, everything):
        _fail(
            subject,
            f"{whole!r} kept {result.kept_tokens:g} of {n} context tokens; keep_ratio=1 must keep "
            "every context token",
        )
    full = subject.registry.policy_class("full")()
    reference = _run(subject, full, seg)
    if result.answer_token_ids != reference.answer_token_ids:
        _fail(
            subject,
            f"{whole!r} answered {result.answer_token_ids} but the full cache answers "
            f"{reference.answer_token_ids}; with nothing evicted the answer must not change "
            "(check positions and the question's handling)",
        )


CHECKS: dict[str, Callable[[_Subject], None]] = {
    "registered": check_registered,
    "fields": check_fields,
    "spec_roundtrip": check_spec_roundtrip,
    "budget": check_budget,
    "determinism": check_determinism,
    "shapes": check_shapes,
    "edge_cases": check_edge_cases,
}
"""Every check by name, in the order :func:`check_policy` runs them."""


def _subject(
    policy: str | type[Policy], registry: Registry | None, lm: LoadedModel | None
) -> _Subject:
    registry = registry or default_registry()
    if isinstance(policy, str):
        if policy not in registry.components.get("policy", {}):
            raise ConformanceError(
                f"policy {policy!r} fails check 'registered': {_not_registered(policy, registry)}"
            )
        cls = registry.policy_class(policy)
        name, given = policy, False
    elif isinstance(policy, type):
        cls, name, given = policy, getattr(policy, "name", policy.__qualname__), True
    else:
        raise TypeError(f"give a policy name or class, not {policy!r}")
    return _Subject(name, cls, registry, lm or _default_lm(), given)


def run_check(
    policy: str | type[Policy],
    check: str,
    *,
    registry: Registry | None = None,
    lm: LoadedModel | None = None,
) -> None:
    """Run one check; raise :class:`ConformanceError` naming the policy and check on failure."""
    if check not in CHECKS:
        raise ValueError(f"unknown check {check!r}; checks: {', '.join(CHECKS)}")
    subject = _subject(policy, registry, lm)
    try:
        CHECKS[check](subject)
    except _Failure as exc:
        raise ConformanceError(f"policy {subject.name!r} fails check {check!r}: {exc}") from None


def check_policy(
    policy: str | type[Policy],
    *,
    registry: Registry | None = None,
    lm: LoadedModel | None = None,
    checks: Iterable[str] | None = None,
) -> list[str]:
    """Run every conformance check (or ``checks``) on ``policy``, a registered name or class.

    Returns the names of the checks that passed; raises :class:`ConformanceError` listing every
    failed check with what went wrong. ``lm`` defaults to a tiny random llama model; ``registry``
    to the installed plugins.
    """
    names = list(checks) if checks is not None else list(CHECKS)
    unknown = [c for c in names if c not in CHECKS]
    if unknown:
        raise ValueError(f"unknown check(s) {unknown}; checks: {', '.join(CHECKS)}")
    subject = _subject(policy, registry, lm)
    passed, failures = [], []
    for name in names:
        try:
            CHECKS[name](subject)
        except _Failure as exc:
            failures.append(f"  - {name}: {exc}")
        else:
            passed.append(name)
    if failures:
        raise ConformanceError(
            f"policy {subject.name!r} fails {len(failures)} of {len(names)} conformance checks:\n"
            + "\n".join(failures)
        )
    return passed


def conformance_cases(policies: Sequence[str] | None = None) -> list:
    """``pytest.param(policy, check)`` for every policy (default: all registered) and check."""
    import pytest

    names = list(policies) if policies is not None else default_registry().names("policy")
    return [pytest.param(p, c, id=f"{p}-{c}") for p in names for c in CHECKS]
