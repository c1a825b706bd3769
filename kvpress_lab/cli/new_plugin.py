"""``kvlab new-plugin NAME``: scaffold a plugin distribution that passes its own tests.

The scaffold is a complete, installable distribution: a ``pyproject.toml`` that registers the
plugin module under the ``kvpress_lab`` entry-point group, a module with a policy and a scorer, a
test that runs the conformance suite (:mod:`kvpress_lab.testing.conformance`) and a README.
"""

from __future__ import annotations

import argparse
import keyword
import re
from pathlib import Path

from rich.console import Console

from kvpress_lab.errors import InputError

NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "new-plugin",
        help="scaffold a plugin distribution (policy + scorer + conformance test)",
        description=(
            "Write a new plugin distribution: pyproject.toml with the kvpress_lab entry point, a "
            "module with a policy and a scorer, and a test that runs the conformance suite. "
            "Install it with `pip install -e DIR` and test it with `python -m pytest DIR`."
        ),
    )
    p.add_argument("name", help="policy name: lowercase letters, digits and _ (e.g. keynorm)")
    p.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="directory to create (default: ./kvlab-NAME); must not exist or be empty",
    )
    p.set_defaults(handler=run)


def check_name(name: str) -> None:
    if not NAME_RE.match(name) or keyword.iskeyword(name):
        raise InputError(
            f"plugin name {name!r} is invalid: use lowercase letters, digits and _ , starting "
            "with a letter (e.g. keynorm)"
        )
    from kvpress_lab.registry import default_registry

    registry = default_registry()
    if name in registry.components.get("policy", {}):
        owner = registry.components["policy"][name].plugin.distribution
        raise InputError(
            f"a policy named {name!r} is already installed (from {owner}); choose another name"
        )


def _class_stem(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_") if part)


def render(name: str) -> dict[str, str]:
    """The scaffold's files, path -> text."""
    dist = "kvlab-" + name.replace("_", "-")
    pkg = f"kvlab_{name}"
    stem = _class_stem(name)
    return {
        "pyproject.toml": f'''[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "0.1.0"
description = "The {name} KV-cache compression policy for kvpress-lab."
requires-python = ">=3.10"
dependencies = ["kvpress-lab>=0.1"]

[project.optional-dependencies]
test = ["pytest>=8"]

# kvpress-lab discovers plugins through this entry-point group: one line per plugin module.
[project.entry-points.kvpress_lab]
{name} = "{pkg}.plugin"

[tool.setuptools]
packages = ["{pkg}"]
''',
        "README.md": f"""# {dist}

A kvpress-lab plugin providing the `{name}` policy (scaffolded by `kvlab new-plugin {name}`).

```bash
pip install -e .              # registers the plugin; `kvlab plugins` lists {name}
python -m pytest tests        # the kvpress-lab conformance suite
kvlab run --policy {name}:keep_ratio=0.25 --context-file doc.txt --question "..."
kvlab compare --policies {name},snapkv
```

Edit `{pkg}/plugin.py`: the scorer's `observe` sees every attention layer during the forward
pass, `score` returns one score per cache slot, and the policy composes the scorer with a
selector and a budgeter.
""",
        f"{pkg}/__init__.py": f'''"""The {name} kvpress-lab plugin."""

from {pkg}.plugin import {stem}Policy, {stem}Scorer

__all__ = ["{stem}Policy", "{stem}Scorer"]
''',
        f"{pkg}/plugin.py": f'''"""The ``{name}`` policy: keep the context tokens the question attends to most.

Replace the scorer with your own idea; the conformance test keeps checking the contract.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import attrs
import torch

from kvlab_plugins.sink_window import SinkWindowBudgeter
from kvlab_plugins.topk import TopKSelector
from kvpress_lab.hookspecs import hookimpl
from kvpress_lab.interfaces import LayerObservation, Scorer, StepLayout
from kvpress_lab.params import Expose, policy_with
from kvpress_lab.policy import Composition


@attrs.define(kw_only=True)
class {stem}Scorer(Scorer):
    """Attention from the question (or the last rows when query-agnostic) to every slot."""

    name: ClassVar[str] = "{name}"

    def observe(self, obs: LayerObservation) -> torch.Tensor:
        # [batch, kv_heads, group, rows, slots] -> [kv_heads, slots]
        return obs.attention(obs.observation_rows())[0].sum(dim=(1, 2))

    def score(
        self,
        layout: StepLayout,
        observed: Sequence[torch.Tensor | None],
        candidates: torch.Tensor,
        cache_keys: Callable[[int], torch.Tensor],
    ) -> torch.Tensor:
        return torch.stack([o for o in observed])  # [layers, kv_heads, slots]


@attrs.define(kw_only=True)
class {stem}Policy(
    policy_with(
        {stem}Scorer,
        Expose(SinkWindowBudgeter, only=("sinks", "window")),
        Expose(TopKSelector, only="granularity"),
        defaults={{"sinks": 4, "window": 8}},
    )
):
    """Keeps ``sinks`` first tokens, a recent ``window`` and the most attended tokens.

    The parameters are the plugins' own attrs fields, declared once (kvpress_lab.params): the
    budgeter's ``sinks`` and ``window``, the selector's ``granularity`` and every field you give
    the scorer (with a default and a validator from kvpress_lab.validators).
    """

    name: ClassVar[str] = "{name}"

    def compose(self) -> Composition:
        return Composition(
            budgeter=self.build(SinkWindowBudgeter),
            selector=self.build(TopKSelector),
            scorers={{"main": self.build({stem}Scorer)}},
        )


@hookimpl
def kvlab_scorers() -> list[type]:
    return [{stem}Scorer]


@hookimpl
def kvlab_policies() -> list[type]:
    return [{stem}Policy]
''',
        f"tests/test_{name}.py": f'''"""The kvpress-lab conformance suite, one test per check."""

import pytest

from kvpress_lab.testing.conformance import conformance_cases, run_check


@pytest.mark.parametrize(("policy", "check"), conformance_cases(["{name}"]))
def test_conformance(policy, check):
    run_check(policy, check)


def test_keeps_budget_on_a_tiny_model():
    from kvpress_lab import run
    from kvpress_lab.testing import tiny_model

    result = run(tiny_model(), "{name}:keep_ratio=0.5", "The pass key is 4721. " * 8, "Key?")
    assert result.kept_tokens == result.target_tokens == result.context_tokens // 2
''',
    }


def scaffold(name: str, directory: Path | None = None) -> Path:
    """Write the scaffold of plugin ``name`` into ``directory`` and return it."""
    check_name(name)
    out = Path(directory) if directory is not None else Path("kvlab-" + name.replace("_", "-"))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(
            f"{out} already exists and is not an empty directory; choose another --dir"
        )
    for rel, text in render(name).items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return out


def run(args: argparse.Namespace) -> int:
    out = scaffold(args.name, args.dir)
    console = Console()
    console.print(f"wrote plugin [bold]{args.name}[/] to {out}/", highlight=False)
    for rel in sorted(render(args.name)):
        console.print(f"  {out / rel}", highlight=False)
    console.print(
        f"next: pip install -e {out}  &&  python -m pytest {out}/tests  &&  kvlab plugins",
        highlight=False,
        markup=False,
    )
    return 0
