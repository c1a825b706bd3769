"""Start-up time of the ``kvlab`` command (pytest-benchmark; not part of the default test run).

Run: ``python -m pytest benchmarks/test_bench_cli_startup.py -s``

Target: ``kvlab --help`` and ``kvlab plugins`` return in under 2 s (wall time of the whole
process, as a user sees it). ``--help`` must not import torch or transformers at all; ``kvlab
plugins`` imports the plugin modules (and so torch) but no model code. Each command is timed
over a few runs and the result is reported against the target; a miss is printed, not failed,
because the number depends on the machine and its load.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TARGET_S = 2.0
KVLAB = Path(sys.executable).parent / "kvlab"


def _kvlab(*args: str) -> None:
    proc = subprocess.run([str(KVLAB), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("args", [("--help",), ("plugins",)], ids=["help", "plugins"])
def test_cli_startup(benchmark, args):
    benchmark.pedantic(_kvlab, args=args, rounds=5, iterations=1, warmup_rounds=1)
    best, median = benchmark.stats.stats.min, benchmark.stats.stats.median
    verdict = "met" if median < TARGET_S else "MISSED"
    print(
        f"\nkvlab {' '.join(args)}: median {median:.2f} s, best {best:.2f} s; "
        f"target < {TARGET_S:.0f} s: {verdict}"
    )
    benchmark.extra_info.update(target_s=TARGET_S, met=median < TARGET_S)


def test_help_imports_neither_torch_nor_transformers():
    """The reason --help is fast, checked directly: the heavy modules stay unloaded."""
    code = (
        "import sys\n"
        "from kvpress_lab.cli.main import build_parser\n"
        "build_parser().format_help()\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'kvlab_plugins') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""
