"""``kvlab plugins``: list policies, scorers, selectors and budgeters, what installed plugins
declare unavailable here (with the reason), and broken plugins."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the registry imports torch; it loads in run(), not with `kvlab --help`
    from kvpress_lab.registry import Registry

# table titles; "policys" is not a word
PLURALS = {
    "policy": "policies",
    "scorer": "scorers",
    "selector": "selectors",
    "budgeter": "budgeters",
}


def add_parser(sub) -> None:
    p = sub.add_parser("plugins", help="list installed policies and plugin components")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run)


def listing(registry: Registry) -> dict:
    from kvpress_lab.registry import KINDS
    from kvpress_lab.spec import describe_parameters

    out: dict = {}
    for kind in KINDS:
        rows = []
        for name in registry.names(kind):
            comp = registry.components[kind][name]
            rows.append(
                {
                    "name": name,
                    "distribution": comp.plugin.distribution,
                    "version": comp.plugin.version,
                    "plugin": comp.plugin.name,
                    "parameters": [
                        {"name": n, "type": t, "default": _jsonable(d)}
                        for n, t, d in describe_parameters(comp.cls)
                    ],
                    "doc": (comp.cls.__doc__ or "").strip().splitlines()[0]
                    if comp.cls.__doc__
                    else "",
                }
            )
        out[kind] = rows
    out["unavailable"] = [
        {
            "name": u.name,
            "plugin": u.plugin.name,
            "distribution": u.plugin.distribution,
            "reason": u.reason,
        }
        for u in registry.unavailable
    ]
    out["problems"] = [
        {"plugin": p.plugin, "distribution": p.distribution, "error": p.error}
        for p in registry.problems
    ]
    return out


def _jsonable(value):
    return value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)


def run(args: argparse.Namespace) -> int:
    from kvpress_lab.registry import KINDS, default_registry

    data = listing(default_registry())
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    for kind in KINDS:
        table = Table(title=PLURALS.get(kind, f"{kind}s"), title_justify="left", show_lines=False)
        table.add_column("name", style="bold")
        table.add_column("distribution")
        table.add_column("parameters (default)")
        for row in data[kind]:
            params = ", ".join(f"{p['name']}={p['default']}" for p in row["parameters"])
            table.add_row(row["name"], f"{row['distribution']} {row['version']}", params or "-")
        console.print(table)
    if data["unavailable"]:
        table = Table(title="unavailable here", title_justify="left", show_lines=False)
        table.add_column("name", style="bold")
        table.add_column("plugin")
        table.add_column("why")
        for row in data["unavailable"]:
            plugin = Text(f"{row['plugin']} ({row['distribution']})")
            table.add_row(Text(row["name"]), plugin, Text(row["reason"]))
        console.print(table)
    if data["problems"]:
        console.print("[bold red]plugins that failed to load (skipped):[/]")
        for p in data["problems"]:
            console.print(f"  {p['plugin']} ({p['distribution']}): {p['error']}", markup=False)
    return 0
