"""Print a set-up command of the README, verbatim, so CI runs exactly what a newcomer copies.

Usage: ``python3 scripts/readme_commands.py main|test``. ``main`` is the one-line command under
"Install and run the main job", ``test`` the one under "Install and run the tests". A README
edit that moves or splits them makes this script fail (and tests/docs/test_newcomer_snippets.py
with it).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
HEADINGS = {"main": "**Install and run the main job**", "test": "**Install and run the tests**"}


def readme_command(which: str, text: str | None = None) -> str:
    text = README.read_text(encoding="utf-8") if text is None else text
    start = text.index(HEADINGS[which])
    block = re.search(r"```bash\n(.*?)\n```", text[start:], re.S)
    if block is None:
        raise ValueError(f"no bash block after {HEADINGS[which]} in README.md")
    lines = [line for line in block[1].splitlines() if line.strip()]
    if len(lines) != 1:
        raise ValueError(f"the README's {which} command must be one line, found {len(lines)}")
    return lines[0]


if __name__ == "__main__":
    print(readme_command(sys.argv[1]))
