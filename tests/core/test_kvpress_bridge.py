"""The kvpress bridge: unavailable without kvpress (simulated here, real in the newest CI
environment), and with kvpress every scorer press as a typed scorer, the `kvpress` policy, the
presses it cannot bridge listed with the reason, and a bridged press running in `kvlab compare`."""

from __future__ import annotations

import importlib.util
import json
import sys
from importlib import metadata

import pytest
from kvlab_plugins import kvpress_bridge
from tiny import save_tiny_model, tiny_model

from kvpress_lab import run
from kvpress_lab.cli import main
from kvpress_lab.cli.plugins import listing
from kvpress_lab.errors import ConfigError, UnknownPolicyError
from kvpress_lab.registry import discover
from kvpress_lab.spec import describe_parameters, load_policy

HAVE_KVPRESS = importlib.util.find_spec("kvpress") is not None
CONTEXT = "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. " * 4
QUESTION = "Which animal jumps?"


@pytest.fixture
def without_kvpress(monkeypatch):
    """The bridge as built where `import kvpress` fails."""
    monkeypatch.setitem(sys.modules, "kvpress", None)  # makes `import kvpress` raise ImportError
    absent = kvpress_bridge.build_bridge()
    monkeypatch.setattr(kvpress_bridge, "bridge", lambda: absent)
    return absent


def test_without_kvpress_the_plugin_reports_itself_unavailable(
    without_kvpress, monkeypatch, capsys
):
    assert not without_kvpress.available and without_kvpress.scorers == ()
    registry = discover()  # every installed plugin, the bridge built without kvpress
    assert not registry.problems, "a missing kvpress must not break plugin loading"
    assert "kvpress" not in registry.names("policy")
    assert not [n for n in registry.names("scorer") if n.startswith("kvpress.")]
    assert {"snapkv", "chunkkv", "full"} <= set(registry.names("policy"))  # the rest still works
    rows = {row["name"]: row for row in listing(registry)["unavailable"]}
    assert set(rows) >= {"kvpress", "kvpress.*"}
    assert rows["kvpress"]["plugin"] == "kvpress_bridge"
    assert "kvpress is not installed" in rows["kvpress"]["reason"]
    with pytest.raises(UnknownPolicyError, match=r"policy 'kvpress' is not available: kvpress is"):
        load_policy("kvpress:press=SnapKVPress", registry=registry)
    with pytest.raises(UnknownPolicyError, match=r"'kvpress.SnapKVPress' is not available: kvpr"):
        registry.get("scorer", "kvpress.SnapKVPress")
    # `kvlab plugins` says why, in its table and in JSON
    import kvpress_lab.registry as reg

    monkeypatch.setattr(reg, "default_registry", lambda: registry)
    monkeypatch.setenv("COLUMNS", "400")
    assert main(["plugins"]) == 0
    text = capsys.readouterr().out
    assert "unavailable here" in text and "kvpress is not installed" in text
    assert main(["plugins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert any(u["name"] == "kvpress" for u in data["unavailable"])


def test_the_installed_environment_matches_what_the_listing_says():
    # the newest CI environment has no kvpress, the transformers-5.2 one has it: both states
    registry = discover()
    unavailable = {u.name: u.reason for u in registry.unavailable}
    if HAVE_KVPRESS:
        assert "kvpress" in registry.names("policy")
        assert "kvpress" not in unavailable
    else:
        assert "kvpress" not in registry.names("policy")
        assert "kvpress is not installed" in unavailable["kvpress"]


def test_a_bad_unavailable_hook_is_a_plugin_problem():
    import types

    module = types.ModuleType("bad_unavailable")
    module.kvlab_unavailable = lambda: [("name-only",)]
    ep = metadata.EntryPoint("bad_unavailable", "bad_unavailable", "kvpress_lab")
    sys.modules["bad_unavailable"] = module
    try:
        registry = discover([ep])
    finally:
        del sys.modules["bad_unavailable"]
    assert [p.plugin for p in registry.problems] == ["bad_unavailable"]
    assert "expected (name, reason) string pairs" in registry.problems[0].error


@pytest.mark.kvpress
@pytest.mark.skipif(not HAVE_KVPRESS, reason="kvpress is not installed in this environment")
def test_scorer_presses_are_typed_scorers_and_the_rest_says_why():
    registry = discover()
    names = registry.names("scorer")
    for press in ("SnapKVPress", "ExpectedAttentionPress", "KnormPress", "TOVAPress"):
        assert f"kvpress.{press}" in names
    snap = registry.get("scorer", "kvpress.SnapKVPress").cls
    assert describe_parameters(snap) == [("window_size", "int", 64), ("kernel_size", "int", 5)]
    ea = dict(
        (n, (t, d))
        for n, t, d in describe_parameters(
            registry.get("scorer", "kvpress.ExpectedAttentionPress").cls
        )
    )
    assert ea["n_sink"] == ("int", 4) and ea["use_vnorm"] == ("bool", True)
    assert repr(snap(window_size=16)) == "KvpressSnapKVPressScorer(window_size=16, kernel_size=5)"
    reasons = {u.name: u.reason for u in registry.unavailable}
    assert reasons["kvpress.AdaKVPress"].startswith("not a ScorerPress: it wraps another press")
    assert "post_init_from_model" in reasons["kvpress.QFilterPress"]
    assert "attention-weight matrix" in reasons["kvpress.ObservedAttentionPress"]
    assert "kvpress.SnapKVPress" not in reasons
    with pytest.raises(UnknownPolicyError, match=r"'AdaKVPress' is not available: not a Scor"):
        load_policy("kvpress:press=AdaKVPress")


@pytest.mark.kvpress
@pytest.mark.skipif(not HAVE_KVPRESS, reason="kvpress is not installed in this environment")
def test_press_spec_parameters_and_errors():
    policy = load_policy("kvpress:keep_ratio=0.25,press=SnapKVPress/window_size=16/kernel_size=3")
    assert repr(policy).endswith("press='SnapKVPress/window_size=16/kernel_size=3')")
    comp = policy.compose()
    assert repr(comp.scorers["main"]) == "KvpressSnapKVPressScorer(window_size=16, kernel_size=3)"
    assert comp.budgeter.keep_ratio == 0.25 and comp.selector.granularity == "head"
    with pytest.raises(ConfigError, match=r"'window_size' got 'x'; expected an integer"):
        load_policy("kvpress:press=SnapKVPress/window_size=x")
    with pytest.raises(ConfigError, match=r"allowed values: key, value, kv_avg, kv_product"):
        load_policy("kvpress:press=CURPress/leverage_type=foo")
    scorer = type(comp.scorers["main"])
    with pytest.raises(ConfigError, match=r"window_size='16' is invalid: kvpress declares it int"):
        scorer(window_size="16")
    with pytest.raises(ConfigError, match=r"sets the budget; give keep_ratio or budget to"):
        load_policy("kvpress:press=KnormPress/keep_ratio=0.1")
    with pytest.raises(UnknownPolicyError, match=r"press='SnapKVPres'.*Did you mean 'SnapKVPress'"):
        load_policy("kvpress:press=SnapKVPres")


@pytest.mark.kvpress
@pytest.mark.skipif(not HAVE_KVPRESS, reason="kvpress is not installed in this environment")
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_bridged_presses_run_at_the_fair_budget(arch):
    lm = tiny_model(arch, seed=1)
    full = run(lm, "full", CONTEXT, QUESTION, max_new_tokens=2)
    for press in ("SnapKVPress/window_size=16", "ExpectedAttentionPress", "TOVAPress"):
        result = run(
            lm, f"kvpress:keep_ratio=0.3,press={press}", CONTEXT, QUESTION, max_new_tokens=2
        )
        assert result.kept_tokens == int(0.3 * full.kept_tokens), press


@pytest.mark.kvpress
@pytest.mark.skipif(not HAVE_KVPRESS, reason="kvpress is not installed in this environment")
def test_a_bridged_press_runs_in_kvlab_compare(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "m")
    out = tmp_path / "out"
    policies = (
        "snapkv,kvpress:press=SnapKVPress/window_size=16,chunkkv:scorer=kvpress+press=TOVAPress"
    )
    argv = [
        "compare", "--policies", policies, "--tasks", "niah", "--lengths", "600",
        "--keep", "0.25", "--samples", "1", "--model", str(model), "--out", str(out),
        "--max-new-tokens", "2", "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr()
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    by_spec = {r["spec"]: r for r in rows}
    assert set(by_spec) == {"full", *policies.split(",")}
    for spec, row in by_spec.items():
        assert not row.get("failed"), (spec, row)
        if spec != "full":  # every policy at the same budget, the bridged ones included
            assert row["kept_tokens"] == row["target_tokens"] == int(0.25 * 600), spec
    assert by_spec["kvpress:press=SnapKVPress/window_size=16"]["params"]["press"] == (
        "SnapKVPress/window_size=16"
    )
