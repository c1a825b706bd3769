"""A dry run of the engine's block loop over a budgeter's allocations: counts, no model.

It replays what :func:`kvpress_lab.engine.runner.prefill_and_compress` does with the slots (the
past kept slots plus the block's, the budgeter's protected set plus ``k`` of its candidates) so
tests can check a budgeter's final count over many settings cheaply. Which candidates survive
does not change the count, so it keeps the first ``k``. Tests compare it with real engine runs.
"""

from __future__ import annotations

import torch

from kvpress_lab.interfaces import StepLayout


def dry_run(budgeter, context_length: int, block_size: int | None) -> list[int]:
    """Kept context tokens after every block (the last entry is the final count)."""
    L = context_length
    S = block_size or L
    bounds = [(s, min(s + S, L)) for s in range(0, L, S)]
    kept = torch.empty(0, dtype=torch.long)
    counts = []
    for bi, (b0, b1) in enumerate(bounds):
        index = torch.cat([kept, torch.arange(b0, b1)])
        layout = StepLayout(
            context_length=L,
            block_index=bi,
            n_blocks=len(bounds),
            block_start=b0,
            block_end=b1,
            n_past=int(kept.numel()),
            n_question=0,
            context_index=index.view(1, 1, -1),
        )
        alloc = budgeter.allocate(layout)
        keep = alloc.protected.expand(1, 1, -1)[0, 0].clone()
        cand = torch.nonzero(alloc.candidates.expand(1, 1, -1)[0, 0]).flatten()
        assert alloc.k <= cand.numel()
        keep[cand[: alloc.k]] = True
        kept = index[keep]
        counts.append(int(kept.numel()))
    return counts
