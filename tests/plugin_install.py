"""Install a plugin distribution into a private directory, as a user's pip would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def pip_install_target(project: Path, target: Path) -> None:
    """``pip install --no-deps --target target project`` (no network needed: setuptools is local)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(project),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
