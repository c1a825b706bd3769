"""Installed plugins that fail: one line naming the plugin and its distribution, never a traceback.

A distribution ``kvlab-boom`` ships policies whose scorer raises and whose selector returns a
duplicate index; ``kvlab-fizzle`` fails to import. Both are installed with pip into a private
directory, as a user would, and driven through the real ``kvlab`` command.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from plugin_install import pip_install_target

BOOM = '''
"""Policies that break at run time."""
from typing import ClassVar
import attrs
import torch
from kvpress_lab.hookspecs import hookimpl
from kvpress_lab.interfaces import Scorer, Selector
from kvpress_lab.policy import Composition, Policy
from kvlab_plugins.sink_window import SinkWindowBudgeter
from kvlab_plugins.topk import TopKSelector

class KaboomScorer(Scorer):
    name: ClassVar[str] = "kaboom"
    def score(self, layout, observed, candidates, cache_keys):
        raise RuntimeError("kaboom: the scorer tripped\\nover two lines")

class DupSelector(Selector):
    name: ClassVar[str] = "dup"
    def select(self, source, candidates, k):
        first = int(candidates[0, 0].nonzero()[0])
        return torch.full((1, 1, k), first, dtype=torch.long)

class IndexScorer(Scorer):
    name: ClassVar[str] = "index"
    def score(self, layout, observed, candidates, cache_keys):
        return layout.context_index.float()

@attrs.define(kw_only=True)
class Boom(Policy):
    name: ClassVar[str] = "boom"
    def compose(self):
        return Composition(budgeter=SinkWindowBudgeter(keep_ratio=self.keep_ratio),
                           scorers={"main": KaboomScorer()}, selector=TopKSelector())

@attrs.define(kw_only=True)
class BoomDup(Policy):
    name: ClassVar[str] = "boom_dup"
    def compose(self):
        return Composition(budgeter=SinkWindowBudgeter(keep_ratio=self.keep_ratio),
                           scorers={"main": IndexScorer()}, selector=DupSelector())

@hookimpl
def kvlab_policies():
    return [Boom, BoomDup]

@hookimpl
def kvlab_selectors():
    return [DupSelector]
'''


def _distribution(root: Path, name: str, module: str, source: str) -> Path:
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
            version = "0.4.2"

            [tool.setuptools]
            py-modules = ["{module}"]

            [project.entry-points.kvpress_lab]
            {module} = "{module}"
            """
        )
    )
    return pkg


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("dists")
    target = root / "site"
    for dist in (
        _distribution(root, "kvlab-boom", "kvlab_boom", BOOM),
        _distribution(
            root, "kvlab-fizzle", "kvlab_fizzle", "raise ImportError('needs libfizzle')\n"
        ),
    ):
        pip_install_target(dist, target)
    return target


@pytest.fixture(scope="module")
def context_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ctx") / "ctx.txt"
    path.write_text("The grass is green. The sky is blue. " * 8)
    return path


def _kvlab(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    kvlab = Path(sys.executable).parent / "kvlab"  # the console script a user runs
    return subprocess.run(
        [str(kvlab), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    err = proc.stderr
    assert "Traceback" not in err, err
    assert err.startswith("kvlab: error: ") and err.count("\n") == 1, err
    return err.strip()


def _run(site, model, ctx, policy) -> subprocess.CompletedProcess:
    return _kvlab(
        site, "run", "--model", str(model), "--policy", policy, "--context-file", str(ctx),
        "--question", "What colour?", "--max-new-tokens", "2",
    )  # fmt: skip


def test_raising_scorer_exits_3_naming_plugin_and_distribution(site, tiny_model_dir, context_file):
    proc = _run(site, tiny_model_dir, context_file, "boom:keep_ratio=0.5")
    assert proc.returncode == 3
    assert _one_line_error(proc) == (
        "kvlab: error: plugin failed: scorer 'kaboom' (kvlab-boom 0.4.2, in policy 'boom') "
        "raised RuntimeError: kaboom: the scorer tripped; fix or update that plugin (or "
        "uninstall it), or choose another policy"
    )


def test_refused_selector_output_exits_3_naming_the_selector(site, tiny_model_dir, context_file):
    proc = _run(site, tiny_model_dir, context_file, "boom_dup:keep_ratio=0.5")
    assert proc.returncode == 3
    err = _one_line_error(proc)
    assert err.startswith(
        "kvlab: error: plugin failed: selector 'dup' (kvlab-boom 0.4.2, in policy 'boom_dup') "
        "returned the same slot twice in one row (layer 0, KV head 0)"
    )


def test_policy_of_a_plugin_that_failed_to_import_names_the_import_error(
    site, tiny_model_dir, context_file
):
    proc = _run(site, tiny_model_dir, context_file, "fizzle")
    assert proc.returncode == 2
    assert _one_line_error(proc) == (
        "kvlab: error: policy 'fizzle' is not available: plugin 'kvlab_fizzle' from kvlab-fizzle "
        "failed to load (ImportError: needs libfizzle); fix or reinstall kvlab-fizzle "
        "(`kvlab plugins` lists broken plugins)"
    )
    # a name no plugin explains still says that some plugins were skipped
    proc = _run(site, tiny_model_dir, context_file, "nothere")
    assert proc.returncode == 2
    assert "unknown policy 'nothere'" in _one_line_error(proc)
    assert "1 plugin(s) failed to load and were skipped" in proc.stderr


def test_plugins_listing_titles_are_plural(site):
    proc = _kvlab(site, "plugins")
    assert proc.returncode == 0, proc.stderr
    assert "policies" in proc.stdout and "policys" not in proc.stdout
    assert "kvlab_fizzle (kvlab-fizzle): ImportError: needs libfizzle" in proc.stdout
    assert "dup" in proc.stdout  # a selector class without attrs is listed, not a crash
