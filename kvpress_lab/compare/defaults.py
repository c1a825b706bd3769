"""Defaults of ``kvlab compare``, in a module light enough for the CLI parser to import."""

from __future__ import annotations

from typing import Any

# Chosen so `kvlab compare --policies laserkv,snapkv` with the default model finishes in under
# 10 minutes on 2 CPU cores while its verdicts rest on 10 paired samples per cell (with 3, no
# paired difference can ever be called: a sign test on 3 of 3 has p = 0.25). Needle retrieval is
# what separates policies with the default model (BABILong-style tasks need a larger one).
# 4.5k tokens is past LASER-KV's block size (4096), so it runs two blocks there; 1k is a cheap
# one-block cell. One keep ratio, 0.1, where policies still differ at these lengths: each more
# keep ratio costs another LASER-KV prefill per long sample. Measured (2026-11-24, SmolLM2-135M,
# float32): 5 min 26 s on 2 otherwise idle CPU cores, 16 min 28 s while test suites shared them.
DEFAULTS: dict[str, Any] = {
    "tasks": ("niah",),
    "lengths": (1024, 4608),
    "keeps": (0.1,),
    "samples": 10,
    "seed": 0,
    "max_new_tokens": 24,
}
