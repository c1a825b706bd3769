"""The ``kvlab`` command. Each sub-command lives in its own module with ``add_parser`` and ``run``."""

from kvpress_lab.cli.main import main

__all__ = ["main"]
