"""Entry point of ``kvlab``: argument parsing and the one place errors become exit statuses.

Sub-command modules import torch, transformers and the plugins inside their ``run`` functions,
never at import time, so ``kvlab --help`` answers without loading them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from kvpress_lab.errors import KvlabError

EXIT_STATUSES = """exit status:
  0  success
  1  an internal error (a bug: a traceback is printed)
  2  bad input or environment (one line, kvlab: error: ..., naming the fix)
  3  a plugin failed: a policy, scorer, selector or budgeter raised or returned output the
     engine refuses (one line naming the plugin and its distribution); in `kvlab compare`,
     one or more cells failed: they are recorded as failed rows, every other cell ran and
     the summary was written"""

# sub-command modules, in help order; each exposes add_parser(subparsers) and run(args) -> int
COMMANDS = ("plugins", "run", "compare", "new_plugin")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvlab",
        description="KV-cache compression policies for Hugging Face transformers models.",
        epilog=EXIT_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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


def _one_line(text: str) -> str:
    """The CLI promises one line per error, whatever a message (or a plugin's text) holds."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KvlabError as exc:
        print(f"kvlab: error: {_one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("kvlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
