"""Output paths checked before any work, so a bad path never throws away a finished run."""

from __future__ import annotations

import os
from pathlib import Path

from kvpress_lab.errors import InputError

__all__ = ["check_output_dir", "check_output_file"]


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_file(path: Path | None, flag: str) -> None:
    """``path`` can be written as a file: not a directory, in an existing writable directory."""
    if path is None:
        return
    if path.is_dir():
        raise InputError(
            f"{flag} {path} is a directory; give a file path, e.g. {flag} {path / 'view.html'}"
        )
    parent = path.absolute().parent
    if not parent.is_dir():
        raise InputError(
            f"{flag} {path}: directory {parent} does not exist; create it first "
            "or give a path in an existing directory"
        )
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"{flag} {path} exists and is not writable; give another path")
    if not path.exists() and not os.access(parent, os.W_OK):
        raise InputError(f"{flag} {path}: directory {parent} is not writable; give another path")


def check_output_dir(path: Path, flag: str) -> None:
    """``path`` is a directory, or can be created as one (its nearest existing parent is a
    writable directory). Nothing is created here."""
    if path.exists():
        if not path.is_dir():
            raise InputError(f"{flag} {path} exists and is not a directory; give a directory path")
        if not os.access(path, os.W_OK):
            raise InputError(f"{flag} {path} is not writable; give another directory")
        return
    base = _nearest_existing(path)
    if not base.is_dir():
        raise InputError(f"{flag} {path}: {base} is a file, so the directory cannot be created")
    if not os.access(base, os.W_OK):
        raise InputError(f"{flag} {path}: {base} is not writable; give another directory")
