"""Results-page tables from a `kvlab compare` summary of the RULER sweep.

    python notes/ruler-suite/tables.py notes/ruler-suite/summary-n3.md

Prints, per length, one markdown row per policy (accuracy, paired differences to `full` and
`snapkv` with their verdicts, at both keep ratios), then the interval widths against the issue's
target: a cell misses it when half its interval, (high - low) / 2, is 0.15 or more; the farthest
end from the mean is printed beside it because bootstrap intervals are not symmetric.
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from pathlib import Path

TARGET = 0.15
INTERVAL = re.compile(r"([-+]?\d\.\d+) \[([-+]?\d\.\d+), ([-+]?\d\.\d+)\]")


def short(verdict: str) -> str:
    if verdict in ("better", "worse", "-"):
        return verdict
    return "n.d."


def main(path: str) -> None:
    cells: dict[str, dict[str, dict[str, list[str]]]] = defaultdict(lambda: defaultdict(dict))
    order: list[str] = []
    for line in Path(path).read_text().splitlines():
        parts = [p.strip() for p in line.strip("|").split("|")]
        # the per-cell table has 13 columns; the timing table shares the `| ruler |` prefix
        if len(parts) != 13 or parts[1] != "ruler":
            continue
        policy, _, length, keep, n, acc, vfull, vfv, vsnap, vsv = parts[:10]
        policy = policy.strip("`")
        if policy not in order:
            order.append(policy)
        cells[length][policy][keep] = [n, acc, vfull, short(vfv), vsnap, short(vsv)]
    for length, by_policy in cells.items():
        ns = sorted({c[0] for keeps in by_policy.values() for c in keeps.values()})
        print(f"\n### {length} (n = {', '.join(ns)})\n")
        print(
            "| policy | keep 0.25: accuracy [95%] | vs full | vs snapkv "
            "| keep 0.1: accuracy [95%] | vs full | vs snapkv |"
        )
        print("|---|---:|---|---|---:|---|---|")
        for policy in order:
            keeps = by_policy.get(policy, {})
            row = []
            for keep in ("0.25", "0.1"):
                c = keeps.get(keep) or keeps.get("1 (full)")
                if c is None:
                    row += ["", "", ""]
                    continue
                _, acc, vfull, vfv, vsnap, vsv = c
                row += [
                    acc,
                    "-" if vfull == "-" else f"{vfull} {vfv}",
                    "-" if vsnap == "-" else f"{vsnap} {vsv}",
                ]
            print(f"| `{policy}` | " + " | ".join(row) + " |")
        wide = []
        widths = []
        for policy in order:
            for keep, c in by_policy.get(policy, {}).items():
                mean, low, high = (float(x) for x in INTERVAL.match(c[1]).groups())
                half = (high - low) / 2
                widths.append(half)
                if half >= TARGET:
                    far = max(mean - low, high - mean)
                    wide.append(f"{policy}@{keep} {c[1]} (half {half:.3f}, far end {far:.2f})")
        print(
            f"\ncells: {len(widths)}; half-widths {min(widths):.3f} to {max(widths):.3f}; "
            f"{len(wide)} at or above +-{TARGET}"
        )
        for w in wide:
            print("  " + w)


if __name__ == "__main__":
    main(sys.argv[1])
