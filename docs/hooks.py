"""mkdocs hooks: render the CLI reference from the parser itself, and link optional pages.

``<!-- kvlab-models -->`` becomes the supported-models table, generated from
:mod:`kvpress_lab.adapters`. ``<!-- kvlab-cli -->`` in a page is replaced by the ``--help`` text of ``kvlab`` and of every
sub-command, taken from :func:`kvpress_lab.cli.main.build_parser` at build time, so the reference
cannot drift from the code. ``docs/scale.md`` (written alongside ``kvlab compare``) is added to the
navigation when it exists.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

MARKER = "<!-- kvlab-cli -->"
MODELS_MARKER = "<!-- kvlab-models -->"
OPTIONAL_PAGES = {"scale.md": "Scaling out (multi-GPU)"}


def _help(parser: argparse.ArgumentParser) -> str:
    os.environ["COLUMNS"] = "100"  # stable wrapping, whatever the terminal
    return parser.format_help().rstrip()


def cli_reference() -> str:
    from kvpress_lab.cli.main import build_parser

    parser = build_parser()
    parts = ["## kvlab", "", "```text", _help(parser), "```", ""]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, child in sub.choices.items():
        parts += [f"## kvlab {name}", "", "```text", _help(child), "```", ""]
    return "\n".join(parts)


def models_table() -> str:
    """The supported architectures, read from the adapters themselves."""
    from kvpress_lab.adapters import ADAPTERS

    rows = ["| `model_type` | adapter | what the adapter handles |", "|---|---|---|"]
    for cls in ADAPTERS:
        for model_type in cls.model_types:
            rows.append(f"| `{model_type}` | `{cls.__name__}` | {', '.join(cls.features)} |")
    return "\n".join(rows)


def _pages(nav):
    for item in nav:
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            for value in item.values():
                yield from _pages(value) if isinstance(value, list) else [value]


def on_config(config, **kwargs):
    docs = Path(config["docs_dir"])
    nav = config.get("nav") or []
    listed = set(_pages(nav))
    for page, title in OPTIONAL_PAGES.items():
        if (docs / page).is_file() and page not in listed:
            # after the tutorials, before the benchmarks
            at = next(
                (
                    i
                    for i, item in enumerate(nav)
                    if isinstance(item, dict) and "Benchmarks" in item
                ),
                len(nav),
            )
            nav.insert(at, {title: page})
    return config


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, cli_reference())
    if MODELS_MARKER in markdown:
        markdown = markdown.replace(MODELS_MARKER, models_table())
    return markdown
