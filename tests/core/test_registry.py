"""Discovery through entry points: first-party plugins, third-party distributions, broken plugins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
from plugin_install import pip_install_target

from kvpress_lab.registry import default_registry, discover

FIRST_PARTY = {"full", "random"}


def test_first_party_plugins_come_from_entry_points():
    registry = default_registry()
    assert FIRST_PARTY <= set(registry.names("policy"))
    for name in FIRST_PARTY:
        comp = registry.get("policy", name)
        assert comp.plugin.distribution == "kvpress-lab"
        assert comp.plugin.module.startswith("kvlab_plugins.")
    assert {"topk", "recency"} <= set(registry.names("selector"))
    assert registry.problems == ()


def _ep(name: str, value: str) -> metadata.EntryPoint:
    return metadata.EntryPoint(name=name, value=value, group="kvpress_lab")


def test_broken_and_clashing_plugins_are_reported_and_skipped(tmp_path, monkeypatch):
    (tmp_path / "kvlab_broken_import.py").write_text("import does_not_exist_anywhere\n")
    (tmp_path / "kvlab_clash.py").write_text(
        textwrap.dedent(
            """
            from kvpress_lab.hookspecs import hookimpl
            from kvlab_plugins.full import FullPolicy

            class Clash(FullPolicy):
                name = "full"

            @hookimpl
            def kvlab_policies():
                return [Clash]
            """
        )
    )
    (tmp_path / "kvlab_typo.py").write_text(
        "from kvpress_lab.hookspecs import hookimpl\n@hookimpl\ndef kvlab_polices():\n    return []\n"
    )
    (tmp_path / "kvlab_not_a_class.py").write_text(
        "from kvpress_lab.hookspecs import hookimpl\n@hookimpl\ndef kvlab_scorers():\n    return [42]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [
        _ep("full", "kvlab_plugins.full"),
        _ep("random", "kvlab_plugins.random_policy"),
        _ep("broken", "kvlab_broken_import"),
        _ep("clash", "kvlab_clash"),
        _ep("typo", "kvlab_typo"),
        _ep("notaclass", "kvlab_not_a_class"),
    ]
    registry = discover(eps)
    assert registry.names("policy") == ["full", "random"]
    assert registry.get("policy", "full").plugin.name == "full"  # the first registration stays
    problems = {p.plugin: p.error for p in registry.problems}
    assert set(problems) == {"broken", "clash", "typo", "notaclass"}
    assert (
        "ModuleNotFoundError" in problems["broken"]
        and "does_not_exist_anywhere" in problems["broken"]
    )
    assert "policy name 'full' is already registered by plugin 'full'" in problems["clash"]
    assert "kvlab_polices" in problems["typo"]
    assert "not a subclass of kvpress_lab.interfaces.Scorer" in problems["notaclass"]


PLUGIN_MODULE = '''
"""A third-party policy: keep the keys with the largest L2 norm."""
from typing import ClassVar
import attrs
from kvpress_lab.hookspecs import hookimpl
from kvpress_lab.interfaces import Scorer
from kvpress_lab.policy import Composition, Policy
from kvlab_plugins.sink_window import SinkWindowBudgeter
from kvlab_plugins.topk import TopKSelector

@attrs.define(kw_only=True)
class NormScorer(Scorer):
    name: ClassVar[str] = "thirdparty_norm"
    def score(self, layout, observed, candidates, cache_keys):
        import torch
        return torch.stack([cache_keys(i)[0].norm(dim=-1) for i in range(layout.context_index.shape[0])])

@attrs.define(kw_only=True)
class NormPolicy(Policy):
    name: ClassVar[str] = "thirdparty"
    def compose(self):
        return Composition(budgeter=SinkWindowBudgeter(keep_ratio=self.keep_ratio, budget=self.budget),
                           scorers={"main": NormScorer()}, selector=TopKSelector())

@hookimpl
def kvlab_policies():
    return [NormPolicy]

@hookimpl
def kvlab_scorers():
    return [NormScorer]
'''


def _make_distribution(root: Path, name: str, module: str, source: str) -> Path:
    pkg = root / name
    pkg.mkdir()
    (pkg / f"{module}.py").write_text(source)
    (pkg / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""
            [build-system]
            requires = ["setuptools>=68"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "{name}"
            version = "1.2.3"

            [tool.setuptools]
            py-modules = ["{module}"]

            [project.entry-points.kvpress_lab]
            {module} = "{module}"
            """
        )
    )
    return pkg


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """A site dir with a working third-party plugin and a broken one, installed by pip."""
    root = tmp_path_factory.mktemp("dists")
    site = root / "site"
    good = _make_distribution(root, "kvlab-thirdparty", "kvlab_thirdparty", PLUGIN_MODULE)
    bad = _make_distribution(
        root, "kvlab-broken", "kvlab_broken", "raise RuntimeError('plugin exploded on import')\n"
    )
    for dist in (good, bad):
        pip_install_target(dist, site)
    return site


def _kvlab(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run(
        [sys.executable, "-m", "kvpress_lab.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_installed_plugin_is_listed_and_broken_one_reported(plugin_site):
    proc = _kvlab(plugin_site, "plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    policies = {row["name"]: row for row in data["policy"]}
    assert policies["thirdparty"]["distribution"] == "kvlab-thirdparty"
    assert policies["thirdparty"]["version"] == "1.2.3"
    assert "full" in policies and "random" in policies
    assert [p["distribution"] for p in data["problems"]] == ["kvlab-broken"]
    assert "RuntimeError: plugin exploded on import" in data["problems"][0]["error"]
    text = _kvlab(plugin_site, "plugins")
    assert (
        text.returncode == 0
        and "thirdparty" in text.stdout
        and "plugin exploded on import" in text.stdout
    )


def test_installed_plugin_runs(plugin_site, tiny_model_dir, tmp_path):
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("The grass is green. The sky is blue. " * 10)
    proc = _kvlab(
        plugin_site,
        "run",
        "--model",
        str(tiny_model_dir),
        "--policy",
        "thirdparty:keep_ratio=0.25",
        "--context-file",
        str(ctx),
        "--question",
        "What colour?",
        "--max-new-tokens",
        "3",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["policy"]["name"] == "thirdparty"
    assert data["kept_tokens"] == int(0.25 * data["context_tokens"])
