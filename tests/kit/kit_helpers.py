"""Helpers for tests that install a plugin distribution into a private directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from plugin_install import pip_install_target  # noqa: E402,F401


def run_with_path(args: list[str], site: Path, cwd: Path, timeout: int = 600):
    """Run ``args`` with ``site`` first on PYTHONPATH, as an installed plugin would be seen."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("PYTEST_ADDOPTS", None)
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)
