"""StreamingLLM: attention sinks plus a sliding window of recent tokens.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024 (official code:
mit-han-lab/streaming-llm). No scores: the first ``n_sink`` tokens and the most recent
``C - n_sink`` are kept. The paper assigns positions inside the cache, so by default the kept keys
are re-rotated to contiguous positions ``0..C-1`` and the question continues at ``C``
(engine ``position_mode="contiguous"``). ``rerotate=False`` keeps original positions and then
equals NVIDIA kvpress's ``StreamingLLMPress``.

With ``block_size`` set the context is streamed block by block and the cache never holds more
than ``C + block_size`` (+ question) tokens: the block engine gives the bounded-memory streaming
of the paper without any policy-specific code.
"""

from __future__ import annotations

from typing import ClassVar

import attrs

from kvlab_plugins.recency import RecencySelector
from kvlab_plugins.sink_window import SinkWindowBudgeter
from kvpress_lab.hookspecs import hookimpl
from kvpress_lab.policy import Composition, EngineOptions, Policy
from kvpress_lab.validators import positive_int


@attrs.define(kw_only=True)
class StreamingLLMPolicy(Policy):
    """Sinks + most recent tokens; re-rotated keys by default; optional block-wise streaming."""

    name: ClassVar[str] = "streamingllm"
    n_sink: int = attrs.field(default=4, validator=positive_int)
    rerotate: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))
    block_size: int | None = attrs.field(default=None, validator=positive_int)

    def compose(self) -> Composition:
        return Composition(
            budgeter=self.build(SinkWindowBudgeter, sinks=self.n_sink),
            selector=RecencySelector(),
            engine=EngineOptions(
                block_size=self.block_size,
                position_mode="contiguous" if self.rerotate else "original",
            ),
        )


@hookimpl
def kvlab_policies() -> list[type]:
    return [StreamingLLMPolicy]
