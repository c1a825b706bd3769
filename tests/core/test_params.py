"""Policies expose their plugins' parameters (kvpress_lab.params) with one set of validators.

The expected parameter lists below are enumerated from the plugin classes' own attrs fields and
a hand-written table of which plugin field each policy parameter comes from, not through
``policy_with``: a parameter lost, renamed or given another default by the refactor fails here.
"""

from __future__ import annotations

import traceback
from typing import Any, ClassVar

import attrs
import pytest
import torch
from kvlab_plugins.accumulative import AccumulativeBudgeter
from kvlab_plugins.chunkkv import ChunkSelector
from kvlab_plugins.expected_attention import ExpectedAttentionScorer
from kvlab_plugins.h2o import H2ODecodeEvictor, H2OScorer
from kvlab_plugins.hybrid import HybridSelector
from kvlab_plugins.kvzip import KVzipScorer
from kvlab_plugins.lsh_scorer import LSHScorer
from kvlab_plugins.observation_window import ObservationWindowBudgeter
from kvlab_plugins.random_policy import RandomScorer
from kvlab_plugins.sink_window import SinkWindowBudgeter
from kvlab_plugins.snapkv import SnapKVScorer
from kvlab_plugins.topk import TopKSelector

from kvpress_lab import policy as policy_module
from kvpress_lab import validators
from kvpress_lab.cli.plugins import listing
from kvpress_lab.errors import ConfigError
from kvpress_lab.interfaces import Scorer
from kvpress_lab.params import Expose, policy_with
from kvpress_lab.policy import Composition, Policy
from kvpress_lab.registry import default_registry
from kvpress_lab.spec import describe_parameters, load_policy

OWN = "own"  # parameters the policy class declares itself: {name: default}
# policy -> where each parameter comes from: (plugin class, {plugin field: policy parameter})
# or (OWN, {parameter: default}); the Policy base's init fields come first for every policy
SOURCES: dict[str, list[tuple[Any, dict[str, Any]]]] = {
    "laserkv": [
        (OWN, {"keep_ratio": 0.25}),
        (
            AccumulativeBudgeter,
            {f: f for f in ("block_size", "protection_divisor", "mode", "lookback")},
        ),
        (HybridSelector, {"alpha": "alpha", "redistribute": "redistribute"}),
        (
            LSHScorer,
            {
                "mode": "lsh_mode",
                "vectors": "lsh_vectors",
                "n_bits": "lsh_bits",
                "n_tables": "lsh_tables",
                "seed": "seed",
            },
        ),
    ],
    "snapkv": [(SnapKVScorer, {f: f for f in ("window", "kernel", "pooling", "aggregation")})],
    "expected_attention": [
        (
            ExpectedAttentionScorer,
            {
                f: f
                for f in ("n_future_positions", "n_sink", "use_covariance", "use_vnorm", "epsilon")
            },
        )
    ],
    "h2o": [
        (H2ODecodeEvictor, {"recent_fraction": "recent_fraction", "query_block": "query_block"}),
        (H2OScorer, {"query_block": "query_block"}),
        (OWN, {"decode_eviction": False}),
    ],
    "random": [(RandomScorer, {"seed": "seed"}), (TopKSelector, {"granularity": "granularity"})],
    "chunkkv": [
        (ChunkSelector, {"chunk_length": "chunk_length", "granularity": "granularity"}),
        (OWN, {"scorer": "snapkv"}),
    ],
    "kvzip": [(KVzipScorer, {"n_sink": "n_sink", "chunk_size": "chunk_size"})],
    "streamingllm": [(OWN, {"n_sink": 4, "rerotate": True, "block_size": None})],
    "finch": [(OWN, {"block_size": 512})],
    "tova": [],
    "knorm": [],
    "keydiff": [],
    "full": [],
}


def _expected(name: str, cls: type) -> dict[str, Any]:
    out = {f.name: f.default for f in attrs.fields(Policy) if f.init}
    if name == "full":  # full fixes its budget: keep_ratio and budget are not parameters
        out = {k: v for k, v in out.items() if k not in ("keep_ratio", "budget")}
    for source, fields in SOURCES[name]:
        if source == OWN:
            out.update(fields)
            continue
        plugin_fields = attrs.fields_dict(source)
        for field, param in fields.items():
            out.setdefault(param, plugin_fields[field].default)
    return out


def _listed(name: str) -> dict[str, Any]:
    rows = {row["name"]: row for row in listing(default_registry())["policy"]}
    return {p["name"]: p["default"] for p in rows[name]["parameters"]}


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_kvlab_plugins_lists_every_parameter_with_its_plugins_default(name):
    cls = default_registry().policy_class(name)
    assert _listed(name) == _expected(name, cls)


def test_every_policy_lists_every_settable_field():
    # every registered policy, first-party or not: the listing is the constructor's parameters
    registry = default_registry()
    for name in registry.names("policy"):
        cls = registry.policy_class(name)
        fields = {f.name: f.default for f in attrs.fields(cls) if f.init}
        assert _listed(name) == fields, name


@pytest.mark.parametrize("name", sorted(n for n, s in SOURCES.items() if s))
def test_exposed_parameters_keep_the_plugins_type_and_validator(name):
    cls = default_registry().policy_class(name)
    types = {n: t for n, t, _ in describe_parameters(cls)}
    for source, fields in SOURCES[name]:
        if source == OWN:
            continue
        plugin_types = {n: t for n, t, _ in describe_parameters(source)}
        for field, param in fields.items():
            assert types[param] == plugin_types[field], (name, param)
    # a shared parameter has the validator of the plugin that declares it (the first listed)
    seen: set[str] = set()
    for source, fields in SOURCES[name]:
        for field, param in fields.items():
            if source == OWN or param in seen:
                continue
            seen.add(param)
            got = attrs.fields_dict(cls)[param].validator
            assert got is attrs.fields_dict(source)[field].validator, (name, param)


# ---- spec strings -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", default_registry().names("policy"))
def test_spec_round_trip_of_the_defaults(name):
    policy = load_policy(name)
    params = ",".join(f"{k}={v}" for k, v in policy.params().items() if k in _listed(name))
    again = load_policy(f"{name}:{params}" if params else name)
    assert again == policy and repr(again) == repr(policy)


def _plugins(policy):
    comp = policy.compose()
    return comp, dict(comp.scorers)


def test_laserkv_spec_reaches_every_plugin():
    spec = "laserkv:keep_ratio=0.1,block_size=2048,alpha=0.5,lsh_mode=frequency_rank,mode=recursive"
    policy = load_policy(spec)
    comp, scorers = _plugins(policy)
    assert comp.budgeter == AccumulativeBudgeter(keep_ratio=0.1, block_size=2048, mode="recursive")
    assert comp.selector == HybridSelector(alpha=0.5)
    assert scorers["lsh"] == LSHScorer(mode="frequency_rank")
    assert comp.engine.block_size == 2048
    spec = (
        "laserkv:budget=300,lsh_vectors=query,lsh_bits=4,lsh_tables=3,seed=9,lookback=false,"
        "redistribute=true,protection_divisor=8"
    )
    policy = load_policy(spec)
    comp, scorers = _plugins(policy)
    assert comp.budgeter == AccumulativeBudgeter(
        keep_ratio=0.25, budget=300, protection_divisor=8, lookback=False
    )
    assert comp.selector == HybridSelector(redistribute=True)
    assert scorers["lsh"] == LSHScorer(vectors="query", n_bits=4, n_tables=3, seed=9)
    round_trip = ",".join(f"{k}={v}" for k, v in policy.params().items())
    assert load_policy(f"laserkv:{round_trip}") == policy


def test_snapkv_window_feeds_scorer_budgeter_and_engine():
    comp, scorers = _plugins(load_policy("snapkv:window=64,kernel=5,pooling=avg"))
    assert scorers["main"] == SnapKVScorer(window=64, kernel=5, pooling="avg")
    assert comp.budgeter == ObservationWindowBudgeter(keep_ratio=0.5, window=64)
    assert comp.engine.observation_window == 64


def test_h2o_and_expected_attention_specs_reach_their_plugins():
    comp, scorers = _plugins(
        load_policy("h2o:recent_fraction=0.25,query_block=16,decode_eviction=true")
    )
    assert scorers["main"] == H2OScorer(query_block=16)
    assert comp.decode_evictor == H2ODecodeEvictor(
        scorer=scorers["main"], recent_fraction=0.25, query_block=16
    )
    assert comp.budgeter.window_fraction == 0.25
    spec = "expected_attention:n_future_positions=128,n_sink=2,use_vnorm=false,epsilon=0.5"
    comp, scorers = _plugins(load_policy(spec))
    assert scorers["main"] == ExpectedAttentionScorer(
        n_future_positions=128, n_sink=2, use_vnorm=False, epsilon=0.5
    )
    assert comp.budgeter == SinkWindowBudgeter(keep_ratio=0.5, sinks=2)
    comp, scorers = _plugins(load_policy("random:seed=3,granularity=layer"))
    assert scorers["main"] == RandomScorer(seed=3)
    assert comp.selector == TopKSelector(granularity="layer")


# ---- one set of validators ----------------------------------------------------------------------


def _raised(make) -> tuple[str, traceback.FrameSummary]:
    with pytest.raises(ConfigError) as err:
        make()
    return str(err.value), traceback.extract_tb(err.value.__traceback__)[-1]


@pytest.mark.parametrize(
    ("spec", "plugin", "message"),
    [
        (
            "laserkv:alpha=1.2",
            lambda: HybridSelector(alpha=1.2),
            "alpha=1.2 is invalid: it must be a number in [0, 1], the share of selected tokens "
            "chosen by exact attention (1 = exact only, 0 = LSH only)",
        ),
        (
            "snapkv:kernel=4",
            lambda: SnapKVScorer(kernel=4),
            "kernel=4 is invalid: the pooling kernel must be an odd integer",
        ),
        (
            "h2o:recent_fraction=1.5",
            lambda: H2ODecodeEvictor(scorer=H2OScorer(), recent_fraction=1.5),
            "recent_fraction=1.5 is invalid: it must be a number in [0, 1], the share of the "
            "budget given to the most recent tokens (H2O: 0.5)",
        ),
        (
            "expected_attention:n_sink=-1",
            lambda: ExpectedAttentionScorer(n_sink=-1),
            "n_sink=-1 is invalid: it must be an integer >= 0",
        ),
        (
            "laserkv:protection_divisor=1",
            lambda: AccumulativeBudgeter(protection_divisor=1),
            "protection_divisor=1 is invalid: it must be an integer >= 2 (anchors and the local "
            "window each take B // n",
        ),
    ],
)
def test_policy_and_plugin_errors_come_from_the_same_function(spec, plugin, message):
    policy_msg, policy_frame = _raised(lambda: load_policy(spec))
    plugin_msg, plugin_frame = _raised(plugin)
    assert policy_msg == plugin_msg and policy_msg.startswith(message)
    assert (policy_frame.filename, policy_frame.lineno) == (
        plugin_frame.filename,
        plugin_frame.lineno,
    )


def test_renamed_parameter_errors_name_the_policy_parameter():
    policy_msg, policy_frame = _raised(lambda: load_policy("laserkv:lsh_bits=0"))
    plugin_msg, plugin_frame = _raised(lambda: LSHScorer(n_bits=0))
    assert policy_msg == "lsh_bits=0 is invalid: it must be an integer in 1..62"
    assert plugin_msg == "n_bits=0 is invalid: it must be an integer in 1..62"
    assert (policy_frame.filename, policy_frame.lineno) == (
        plugin_frame.filename,
        plugin_frame.lineno,
    )


def test_fractions_share_one_check_and_old_imports_still_work():
    alpha = attrs.fields_dict(HybridSelector)["alpha"].validator
    window_fraction = attrs.fields_dict(SinkWindowBudgeter)["window_fraction"].validator
    recent = attrs.fields_dict(H2ODecodeEvictor)["recent_fraction"].validator
    assert alpha.__code__ is window_fraction.__code__ is recent.__code__
    assert policy_module.check_keep_ratio is validators.check_keep_ratio
    assert policy_module.positive_int is validators.positive_int
    tables = attrs.fields_dict(LSHScorer)["n_tables"].validator
    assert tables is attrs.fields_dict(SnapKVScorer)["window"].validator is validators.positive_int


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-0.1, "f=-0.1 is invalid: it must be a number in [0, 1] or None, the share"),
        (True, "f=True is invalid: it must be a number in [0, 1] or None"),
        ("0.5", "f='0.5' is invalid"),
    ],
)
def test_unit_interval_messages(value, message):
    @attrs.define
    class C:
        f: float | None = attrs.field(
            validator=validators.unit_interval("the share", optional=True)
        )

    assert C(None).f is None and C(1).f == 1
    with pytest.raises(ConfigError) as err:
        C(value)
    assert str(err.value).startswith(message)


# ---- the mechanism, on toy plugins --------------------------------------------------------------


@attrs.define(kw_only=True)
class WindowScorer(Scorer):
    name: ClassVar[str] = "toy_window"
    window: int = attrs.field(default=8, validator=validators.positive_int)
    power: float = 1.0

    def score(self, layout, observed, candidates, cache_keys) -> torch.Tensor:
        return torch.zeros(layout.context_index.shape)


@attrs.define(kw_only=True)
class WindowBudgeter:
    keep_ratio: float | None = attrs.field(default=1.0, validator=validators.check_keep_ratio)
    window: int = attrs.field(default=16, validator=validators.non_negative_int)
    mode: str = "a"


def test_a_name_in_two_plugins_must_be_shared_or_renamed():
    with pytest.raises(ConfigError) as err:
        policy_with(WindowScorer, WindowBudgeter)
    assert str(err.value) == (
        "policy_with: parameter 'window' is a field of both WindowScorer and WindowBudgeter; "
        "write Expose(WindowBudgeter, share=('window',)) to feed both from one parameter, or "
        "Expose(WindowBudgeter, rename=...) to give WindowBudgeter's its own name"
    )

    @attrs.define(kw_only=True)
    class Shared(policy_with(WindowScorer, Expose(WindowBudgeter, share="window"))):
        name: ClassVar[str] = "toy_shared"

        def compose(self) -> Composition:
            raise NotImplementedError

    # the first plugin declares the parameter (its default and validator); both read it
    assert [n for n, _, _ in describe_parameters(Shared)][-3:] == ["window", "power", "mode"]
    policy = Shared(keep_ratio=0.3, window=5)
    assert policy.build(WindowScorer) == WindowScorer(window=5)
    assert policy.build(WindowBudgeter) == WindowBudgeter(keep_ratio=0.3, window=5)
    with pytest.raises(ConfigError, match="window=0 is invalid: it must be an integer >= 1"):
        Shared(window=0)

    @attrs.define(kw_only=True)
    class Renamed(policy_with(WindowScorer, Expose(WindowBudgeter, rename={"window": "tail"}))):
        name: ClassVar[str] = "toy_renamed"

        def compose(self) -> Composition:
            raise NotImplementedError

    policy = Renamed(window=3, tail=0, mode="b")
    assert policy.build(WindowBudgeter, mode="c") == WindowBudgeter(
        keep_ratio=0.5, window=0, mode="c"
    )
    assert policy.build(WindowScorer) == WindowScorer(window=3)
    with pytest.raises(ConfigError, match="tail=-1 is invalid: it must be an integer >= 0"):
        Renamed(tail=-1)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: policy_with(WindowScorer, Expose(WindowBudgeter, share=("window", "mode"))),
            r"Expose\(WindowBudgeter, share=\['mode'\]\): no earlier plugin declares",
        ),
        (lambda: Expose(WindowBudgeter, only=("windw",)), r"has no init field\(s\) \['windw'\]"),
        (lambda: policy_with(WindowScorer, WindowScorer), "WindowScorer is exposed twice"),
        (
            lambda: policy_with(WindowScorer, defaults={"kernel": 3}),
            r"defaults for unknown parameter\(s\) \['kernel'\]",
        ),
        (
            lambda: policy_with(Expose(H2ODecodeEvictor, only=("scorer",))),
            r"H2ODecodeEvictor.scorer has no default",
        ),
        (lambda: Expose(int), "only attrs classes can expose their fields"),
    ],
)
def test_declaration_mistakes_are_reported_at_class_creation(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_defaults_fixed_and_base_fields():
    base = policy_with(
        Expose(WindowBudgeter, fixed={"mode": "z"}), defaults={"keep_ratio": 0.2, "window": 4}
    )
    # keep_ratio keeps its place (first) and its validator; fixed fields are not parameters
    params = describe_parameters(base)
    assert params[0] == ("keep_ratio", "float | None", 0.2)
    assert [n for n, _, _ in params][-1] == "window" and "mode" not in dict(
        (n, d) for n, _, d in params
    )
    assert attrs.fields_dict(base)["window"].default == 4

    @attrs.define(kw_only=True)
    class Toy(base):
        name: ClassVar[str] = "toy_defaults"

        def compose(self) -> Composition:
            raise NotImplementedError

    assert Toy().build(WindowBudgeter) == WindowBudgeter(keep_ratio=0.2, window=4, mode="z")
    # only= selects the exposed parameters; the policy's budget still reaches the budgeter
    narrow = policy_with(Expose(WindowBudgeter, only=("mode",)), defaults={"mode": "q"})
    narrow = attrs.define(kw_only=True)(
        type("Narrow", (narrow,), {"name": "toy_narrow", "compose": lambda self: None})
    )
    assert [n for n, _, _ in describe_parameters(narrow)][-1] == "mode"
    assert narrow(keep_ratio=0.3).build(WindowBudgeter) == WindowBudgeter(keep_ratio=0.3, mode="q")
    with pytest.raises(ConfigError, match="keep_ratio=0.0 is invalid"):
        Toy(keep_ratio=0.0)
    # a plugin the policy does not expose gets the Policy base's fields it has (its budget)
    assert Toy(budget=7).build(SinkWindowBudgeter, sinks=2) == SinkWindowBudgeter(
        keep_ratio=0.2, budget=7, sinks=2
    )


def test_listing_survives_annotations_that_do_not_resolve():
    # a policy compiled with postponed annotations in a namespace no module holds (as the
    # tutorial runner does): its own fields are listed, resolvable types resolved
    import __future__

    code = (
        "import attrs\n"
        "from typing import ClassVar, Literal\n"
        "from kvpress_lab.policy import Policy\n"
        "Mode = Literal['a', 'b']\n"
        "@attrs.define(kw_only=True)\n"
        "class Loose(Policy):\n"
        "    name: ClassVar[str] = 'loose'\n"
        "    size: int = 3\n"
        "    mode: Mode = 'a'\n"
        "    def compose(self): ...\n"
    )
    ns: dict = {"__name__": "__nowhere__"}
    exec(compile(code, "<loose>", "exec", flags=__future__.annotations.compiler_flag), ns)
    listed = describe_parameters(ns["Loose"])
    assert listed[0] == ("keep_ratio", "float | None", 0.5)
    assert listed[-2:] == [("size", "int", 3), ("mode", "Mode", "a")]
