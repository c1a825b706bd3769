"""Entry point of ``kvlab``: argument parsing and the one place user errors become exit code 2."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from kvpress_lab.errors import KvlabError

# sub-command modules, in help order; each exposes add_parser(subparsers) and run(args) -> int
COMMANDS = ("plugins", "run", "compare", "new_plugin")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvlab",
        description="KV-cache compression policies for Hugging Face transformers models.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"kvpress_lab.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"kvpress_lab.cli.{name}":
                continue  # command not built yet in this checkout
            raise
        module.add_parser(sub)
    return parser


def _version() -> str:
    from kvpress_lab import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KvlabError as exc:
        print(f"kvlab: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("kvlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
