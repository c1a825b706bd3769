"""Policy spec strings: parsing, typed conversion and the error messages users see."""

from __future__ import annotations

import pytest

from kvpress_lab.errors import ConfigError, UnknownPolicyError
from kvpress_lab.spec import load_policy, parse_spec


def test_parse_spec():
    assert parse_spec("full") == ("full", {})
    assert parse_spec(" random : keep_ratio=0.1 , seed=3 ") == (
        "random",
        {"keep_ratio": "0.1", "seed": "3"},
    )


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "empty policy spec"),
        ("random:keep_ratio", "'keep_ratio' is not param=value"),
        ("random:seed=1,seed=2", "parameter 'seed' given twice"),
    ],
)
def test_parse_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_spec(spec)


def test_values_are_typed():
    policy = load_policy("random:keep_ratio=0.1,seed=7,granularity=layer")
    assert (policy.keep_ratio, policy.seed, policy.granularity) == (0.1, 7, "layer")
    assert repr(policy) == (
        "RandomPolicy(keep_ratio=0.1, budget=None, decode_interval=None, "
        "decode_budget=None, seed=7, granularity='layer')"
    )
    assert load_policy("random:budget=128").budget == 128
    assert load_policy("random:budget=none").budget is None


def test_repr_is_the_config_record():
    policy = load_policy("random:keep_ratio=0.2,seed=5")
    params = ",".join(f"{k}={v}" for k, v in policy.params().items())
    assert load_policy(f"random:{params}") == policy


def test_unknown_policy_suggests_close_match():
    with pytest.raises(UnknownPolicyError) as err:
        load_policy("randon")
    msg = str(err.value)
    assert "unknown policy 'randon'" in msg and "Did you mean 'random'?" in msg
    assert "full" in msg and "random" in msg


@pytest.mark.parametrize(
    "spec, message",
    [
        ("random:kep_ratio=0.5", "random has no parameter 'kep_ratio'. Did you mean 'keep_ratio'?"),
        ("random:keep_ratio=abc", "parameter 'keep_ratio' got 'abc'; expected a number"),
        ("random:keep_ratio=0", r"keep_ratio=0.0 is invalid: it must be a number in \(0, 1\]"),
        ("random:keep_ratio=1.5", r"keep_ratio=1.5 is invalid: it must be a number in \(0, 1\]"),
        ("random:keep_ratio=-0.2", r"keep_ratio=-0.2 is invalid"),
        ("random:seed=1.5", "parameter 'seed' got '1.5'; expected an integer"),
        (
            "random:granularity=token",
            "parameter 'granularity' got 'token'; allowed values: global, layer, head",
        ),
        ("random:budget=0", "budget=0 is invalid: it must be an integer >= 1"),
        ("random:keep_ratio=0.2,budget=10", "give keep_ratio or budget, not both"),
    ],
)
def test_bad_parameters_name_parameter_value_and_allowed(spec, message):
    with pytest.raises(ConfigError, match=message):
        load_policy(spec)


def test_overrides_apply_but_spec_wins():
    assert load_policy("random", keep_ratio=0.25).keep_ratio == 0.25
    assert load_policy("random:keep_ratio=0.1", keep_ratio=0.25).keep_ratio == 0.1
