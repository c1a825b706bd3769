"""Defaults of ``kvlab compare``, in a module light enough for the CLI parser to import."""

from __future__ import annotations

from typing import Any

# Chosen so `kvlab compare --policies laserkv,snapkv` with the default model finishes in minutes
# on 2 CPU cores (measured time in notes/compare-run.md). Needle retrieval is what separates
# policies with the default model (BABILong-style tasks need a larger one); at keep 0.5 every
# policy still finds the needle at these lengths, so the defaults look at 0.25 and 0.1.
DEFAULTS: dict[str, Any] = {
    "tasks": ("niah",),
    "lengths": (1024, 2048),
    "keeps": (0.25, 0.1),
    "samples": 3,
    "seed": 0,
    "max_new_tokens": 24,
}
