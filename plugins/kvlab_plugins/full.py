"""The ``full`` policy: no compression; the reference row of every comparison."""

from __future__ import annotations

from typing import ClassVar

import attrs

from kvlab_plugins.recency import RecencySelector
from kvlab_plugins.sink_window import SinkWindowBudgeter
from kvpress_lab.hookspecs import hookimpl
from kvpress_lab.policy import Composition, Policy


@attrs.define(kw_only=True)
class FullPolicy(Policy):
    """Keeps every context token. Budget settings do not apply and are fixed."""

    name: ClassVar[str] = "full"
    keep_ratio: float | None = attrs.field(default=1.0, init=False)
    budget: int | None = attrs.field(default=None, init=False)

    def compose(self) -> Composition:
        return Composition(budgeter=self.build(SinkWindowBudgeter), selector=RecencySelector())


@hookimpl
def kvlab_policies() -> list[type]:
    return [FullPolicy]
