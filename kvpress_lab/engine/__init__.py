"""The compression engine: block loop, cache surgery, decoding and results."""

from kvpress_lab.engine.api import run, run_segments
from kvpress_lab.engine.result import RunResult
from kvpress_lab.engine.runner import CompressedContext, prefill_and_compress

__all__ = ["CompressedContext", "RunResult", "prefill_and_compress", "run", "run_segments"]
