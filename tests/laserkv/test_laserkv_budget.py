"""LASER-KV budget arithmetic, allocation masks and configuration errors (no model needed)."""

from __future__ import annotations

import math

import pytest
import torch
from budget_oracle import dry_run
from kvlab_plugins.accumulative import AccumulativeBudgeter
from kvlab_plugins.laserkv import LaserKVPolicy

from kvpress_lab.errors import ConfigError
from kvpress_lab.interfaces import StepLayout
from kvpress_lab.spec import load_policy


@pytest.mark.parametrize(
    ("L", "S", "r", "mode", "expected"),
    [
        # accumulate: B = min(floor(2 r S L / (S + L)), floor(r L)); a = w = B // 4;
        # G = B - 2 (B // 4); the last field is the target floor(r L)
        # 2 * 0.25 * 32 * 96 / 128 = 1536 / 128 = 12 (< 24) -> a = w = 3, G = 6
        (96, 32, 0.25, "accumulate", (12, 3, 3, 6, False, 24)),
        # 2 * 0.25 * 4096 * 16384 / 20480 = 33554432 / 20480 = 1638.4 -> 1638; a = w = 409,
        # G = 1638 - 818 = 820; target 4096
        (16384, 4096, 0.25, "accumulate", (1638, 409, 409, 820, False, 4096)),
        # 2 * 0.1 * 2048 * 8000 / 10048 = 3276800 / 10048 = 326.11 -> 326; a = w = 81, G = 164
        (8000, 2048, 0.1, "accumulate", (326, 81, 81, 164, False, 800)),
        # one block: 2 * 0.75 * 4096 * 1000 / 5096 = 1205.65 -> 1205 > floor(0.75 * 1000) = 750,
        # so B = 750, a = w = 187, G = 750 - 374 = 376 (the paper kept all 1000 since L <= 1205)
        (1000, 4096, 0.75, "accumulate", (750, 187, 187, 376, False, 750)),
        # the case: 2 * 0.75 * 4096 * 2048 / 6144 = 2048 = L (the paper keeps 100 %);
        # B = floor(0.75 * 2048) = 1536, a = w = 384, G = 768
        (2048, 4096, 0.75, "accumulate", (1536, 384, 384, 768, False, 1536)),
        # recursive: B = floor(r L) = floor(0.25 * 96) = 24; a = w = 6, G = 12
        (96, 32, 0.25, "recursive", (24, 6, 6, 12, False, 24)),
        # keep_ratio 1 keeps everything although 2 * 1 * 32 * 96 / 128 = 48 < 96
        (96, 32, 1.0, "accumulate", (48, 12, 12, 24, True, 96)),
    ],
)
def test_block_budget_table(L, S, r, mode, expected):
    bb = AccumulativeBudgeter(keep_ratio=r, block_size=S, mode=mode).block_budget(L)
    assert (bb.per_block, bb.anchors, bb.window, bb.pool, bb.keep_all, bb.target) == expected


def test_divisor_changes_the_split():
    # B = 12 as above; n = 3: a = w = 4, G = 12 - 8 = 4
    bb = AccumulativeBudgeter(keep_ratio=0.25, block_size=32, protection_divisor=3).block_budget(96)
    assert (bb.anchors, bb.window, bb.pool) == (4, 4, 4)


@pytest.mark.parametrize(
    ("L", "S", "r", "mode", "lookback", "counts"),
    [
        # 3 full blocks, B = 12, a = w = 3, G = 6: 3 + 6 + 3 = 12 after block 0, +6 per block,
        # 24 = r L at the end; the scaled schedule 24 * (192 + 6x) / (192 + 576) never binds
        (96, 32, 0.25, "accumulate", True, [12, 18, 24]),
        # without look-back the non-final tails are dropped: 3 + 6 = 9, 15, then 15 + 6 + 3 = 24
        (96, 32, 0.25, "accumulate", False, [9, 15, 24]),
        # L = 136, S = 32: B = floor(2176 / 168 = 12.95) = 12, a = w = 3, G = 6; 5 blocks (the
        # last holds 8): 12, 18, 24, 30, then the last block keeps 34 - 30 = 4, not G = 6
        (136, 32, 0.25, "accumulate", True, [12, 18, 24, 30, 34]),
        # without look-back: 9, 15, 21, 27 (tails dropped), last: 27 + 3 protected + k = 4
        (136, 32, 0.25, "accumulate", False, [9, 15, 21, 27, 34]),
        # the short-last-block case, L = 200, S = 48, r = 0.3: B = floor(23.2) = 23,
        # a = w = 5, G = 13; G in every block would reach 5 + 4 * 13 + 5 = 62 > 60 before the
        # last block. Scaled schedule 60 * (480 + 13 x) / (480 + 2600): after x = 48, 96, 144,
        # 192 it allows floor(21.5) = 21, floor(33.7) = 33, floor(45.8) = 45, floor(57.97) = 57;
        # the last block [192, 200) protects 52 + 5 = 57 and picks 3 of T + 3 tokens -> 60
        (200, 48, 0.3, "accumulate", True, [21, 33, 45, 57, 60]),
        # r = 0.9, L = 40, S = 16: B = floor(20.57) = 20, a = w = 5, G = 10, target 36. Block 0
        # has 6 candidates (all kept: 16); block 1 must keep 36 - 8 = 28 for the last block to
        # reach the target (G = 10 would give 26 and then 26 + min(8, 10) = 34); the last block
        # protects 23 + 5 and takes all 8 candidates (T + 32..34) -> 36
        (40, 16, 0.9, "accumulate", True, [16, 28, 36]),
        # recursive, L = 200, S = 48, r = 0.3: B = 60, a = w = 15, G = 30; block 0 offers only
        # 48 - 30 = 18 candidates (48 kept), then A is rebuilt to 60 after every block
        (200, 48, 0.3, "recursive", True, [48, 60, 60, 60, 60]),
        # recursive: the cache is rebuilt to B = floor(0.25 * 96) = 24
        (96, 32, 0.25, "recursive", True, [24, 24, 24]),
        # keep_ratio 1: everything
        (96, 32, 1.0, "accumulate", True, [32, 64, 96]),
    ],
)
def test_block_by_block_counts_end_on_the_target(L, S, r, mode, lookback, counts):
    budgeter = AccumulativeBudgeter(keep_ratio=r, block_size=S, mode=mode, lookback=lookback)
    assert dry_run(budgeter, L, S) == counts
    assert budgeter.target_tokens(L) == counts[-1]


def test_final_count_is_the_target_for_long_contexts():
    # 32768 / 4096 = 8 blocks, B = floor(2*0.25*4096*32768/36864) = floor(1820.44) = 1820,
    # a = w = 455, G = 910: G in every block ends at 455 + 8*910 + 455 = 8190; the last block
    # takes G + 2 -> r L = 8192
    assert dry_run(AccumulativeBudgeter(keep_ratio=0.25), 32768, 4096)[-2:] == [7280, 8192]
    # L = 4850, S = 4096: B = floor(2*0.25*4096*4850/8946) = floor(1110.3) = 1110, a = w = 277,
    # G = 556; G in both blocks would keep 277 + 556 + 556 + 277 = 1666 (34 %). The scaled
    # schedule allows floor(1212 * 4546560 / 4965784) = floor(1109.68) = 1109 after block 0
    # (k = 555), and the last block tops up to floor(0.25 * 4850) = 1212
    assert dry_run(AccumulativeBudgeter(keep_ratio=0.25), 4850, 4096) == [1109, 1212]


@pytest.mark.parametrize("mode", ["accumulate", "recursive"])
@pytest.mark.parametrize("S", [16, 48, 100, 512])
@pytest.mark.parametrize("n", [2, 3, 4, 6])
def test_every_setting_lands_on_the_target(mode, S, n):
    """Over many (L, r), look-back on: the final count is floor(r L) whenever the budget is valid."""
    checked = 0
    for L in [*range(5, 400, 13), S, 2 * S, 3 * S + 1, 4 * S - 1, 1500]:
        for r in (0.05, 0.1, 0.25, 0.3, 0.5, 0.6, 0.75, 0.9, 0.99):
            budgeter = AccumulativeBudgeter(
                keep_ratio=r, block_size=S, protection_divisor=n, mode=mode
            )
            try:
                budgeter.validate(L)
            except ConfigError:
                continue
            # the target is floor(r L), at least 1 token
            assert dry_run(budgeter, L, S)[-1] == max(1, math.floor(r * L + 1e-9)), (L, r)
            checked += 1
    assert checked > 100


def test_without_lookback_a_large_ratio_is_out_of_reach():
    # look-back off drops every non-final tail unseen: L = 82, S = 16, r = 0.75: B = 20,
    # a = w = 5; 5 non-final blocks drop 5 each, so at most 82 - 25 = 57 < floor(61.5) = 61 remain
    budgeter = AccumulativeBudgeter(keep_ratio=0.75, block_size=16, lookback=False)
    assert dry_run(budgeter, 82, 16)[-1] == 57
    assert budgeter.target_tokens(82) == 61  # the target does not move to meet the policy


def test_budget_tokens_act_as_a_ratio():
    # budget = 24 of L = 96 is r = 0.25: same B, same count as keep_ratio=0.25
    by_budget = AccumulativeBudgeter(keep_ratio=None, budget=24, block_size=32)
    assert by_budget.block_budget(96).per_block == 12
    assert dry_run(by_budget, 96, 32)[-1] == by_budget.target_tokens(96) == 24
    over = AccumulativeBudgeter(keep_ratio=None, budget=500, block_size=32)
    assert over.block_budget(96).keep_all and dry_run(over, 96, 32)[-1] == 96


def test_laserkv_target_is_the_plain_budget():
    # the policy does not predict its own count (the paper's arithmetic kept 2048 and 62 here):
    # its target is floor(r L) like every policy's
    assert LaserKVPolicy(keep_ratio=0.75).target_tokens(2048) == 1536
    assert LaserKVPolicy(keep_ratio=0.3, block_size=48).target_tokens(200) == 60


def _layout(past: list[int], b0: int, b1: int, L: int, q: int = 2, bi: int = 1, nb: int = 3):
    index = torch.tensor(past + list(range(b0, b1)) + [-1] * q).view(1, 1, -1)
    return StepLayout(
        context_length=L,
        block_index=bi,
        n_blocks=nb,
        block_start=b0,
        block_end=b1,
        n_past=len(past),
        n_question=q,
        context_index=index,
    )


def _positions(layout, mask):
    return layout.context_index[0, 0][mask.expand_as(layout.context_index)[0, 0]].tolist()


def test_allocation_masks_accumulate_with_lookback():
    # L = 96, S = 32, r = 0.25: a = w = 3, G = 6. Block 1 = [32, 64); A = {0..8}, T = {29, 30, 31}
    budgeter = AccumulativeBudgeter(keep_ratio=0.25, block_size=32)
    layout = _layout(list(range(9)) + [29, 30, 31], 32, 64, 96)
    alloc = budgeter.allocate(layout)
    assert _positions(layout, alloc.protected) == list(range(9)) + [61, 62, 63]
    assert _positions(layout, alloc.candidates) == [29, 30, 31] + list(range(32, 61))
    assert alloc.k == 6


def test_allocation_masks_accumulate_without_lookback():
    budgeter = AccumulativeBudgeter(keep_ratio=0.25, block_size=32, lookback=False)
    layout = _layout(list(range(9)) + list(range(32, 38)), 64, 96, 96, bi=1, nb=3)
    alloc = budgeter.allocate(layout)
    # not the last block: its tail 93..95 is neither protected nor a candidate (dropped)
    assert _positions(layout, alloc.protected) == list(range(9)) + list(range(32, 38))
    assert _positions(layout, alloc.candidates) == list(range(64, 93))
    last = _layout(list(range(9)) + list(range(32, 38)), 64, 96, 96, bi=2, nb=3)
    alloc = budgeter.allocate(last)
    assert _positions(last, alloc.protected) == list(range(9)) + list(range(32, 38)) + [93, 94, 95]


def test_allocation_masks_recursive():
    # recursive, B = 24, a = w = 6, G = 12; past = anchors 0..5, selected 6..17, tail 26..31
    budgeter = AccumulativeBudgeter(keep_ratio=0.25, block_size=32, mode="recursive")
    past = list(range(18)) + list(range(26, 32))
    layout = _layout(past, 32, 64, 96)
    alloc = budgeter.allocate(layout)
    assert _positions(layout, alloc.protected) == list(range(6)) + list(range(58, 64))
    assert _positions(layout, alloc.candidates) == list(range(6, 18)) + list(range(26, 58))
    assert alloc.k == 12


def test_final_block_not_longer_than_window_keeps_previous_tail_as_candidates():
    # L = 66, S = 32, r = 0.3: B = floor(2*0.3*32*66/98 = 12.93) = 12, a = w = 3, G = 6.
    # A = {0..8, 29..34}, T = {61, 62, 63}; the final block [64, 66) is all tail. T must still
    # be offered (the reference skipped selection when the block had no candidates of its own
    # and dropped T): k = min(3, floor(0.3 * 66) - 17 protected) = min(3, 19 - 17) = 2.
    budgeter = AccumulativeBudgeter(keep_ratio=0.3, block_size=32)
    layout = _layout(list(range(9)) + list(range(29, 35)) + [61, 62, 63], 64, 66, 66, bi=2, nb=3)
    alloc = budgeter.allocate(layout)
    assert _positions(layout, alloc.candidates) == [61, 62, 63]
    assert alloc.k == 2
    assert _positions(layout, alloc.protected) == list(range(9)) + list(range(29, 35)) + [64, 65]
    assert dry_run(budgeter, 66, 32)[-1] == budgeter.target_tokens(66) == 19


def test_keep_ratio_one_protects_every_context_slot():
    budgeter = AccumulativeBudgeter(keep_ratio=1.0, block_size=32)
    layout = _layout(list(range(40)), 40, 72, 200)
    alloc = budgeter.allocate(layout)
    assert _positions(layout, alloc.protected) == list(range(72))
    assert alloc.k == 0 and not bool(alloc.candidates.any())


# ---- configuration errors, raised before any model work ---------------------------------------
@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("laserkv:protection_divisor=1", "protection_divisor=1 is invalid"),
        ("laserkv:protection_divisor=0", "protection_divisor=0 is invalid"),
        ("laserkv:block_size=0", "block_size=0 is invalid"),
        ("laserkv:keep_ratio=0", "keep_ratio=0.0 is invalid"),
        ("laserkv:keep_ratio=1.5", "keep_ratio=1.5 is invalid"),
        ("laserkv:keep_ratio=-0.1", "keep_ratio=-0.1 is invalid"),
        ("laserkv:alpha=1.2", "alpha=1.2 is invalid"),
        ("laserkv:lsh_bits=0", "lsh_bits=0 is invalid"),
        ("laserkv:lsh_mode=sampling", "sampling"),
        ("laserkv:mode=greedy", "greedy"),
    ],
)
def test_bad_settings_fail_when_the_policy_is_built(spec, message):
    with pytest.raises(ConfigError, match=message):
        load_policy(spec)


def test_empty_pool_fails_in_validate_with_the_numbers():
    # n = 2, B = 12: a = w = 6, G = 12 - 12 = 0
    budgeter = (
        LaserKVPolicy(keep_ratio=0.25, block_size=32, protection_divisor=2).compose().budgeter
    )
    with pytest.raises(
        ConfigError,
        match=r"B = min\(floor\(2\*r\*S\*L/\(S\+L\)\), floor\(r\*L\)\) = 12.*G = .* = 0 <= 0",
    ):
        budgeter.validate(96)
    # tiny ratio: 2 * 0.01 * 4096 * 50 / 4146 = 0.99 -> B = 0, G = 0
    with pytest.raises(ConfigError, match="keep_ratio=0.01.*L=50"):
        AccumulativeBudgeter(keep_ratio=0.01).validate(50)


def test_empty_pool_is_raised_before_the_model_runs():
    from kvpress_lab.engine.runner import prefill_and_compress
    from kvpress_lab.prompt import PromptSegments

    class Exploding:
        """A model stand-in whose every use fails: validation must come first."""

        def __getattr__(self, name):
            raise AssertionError(f"model touched ({name}) before validation")

    class LM:
        model = Exploding()
        device = torch.device("cpu")

    segments = PromptSegments(torch.arange(3, 99), torch.tensor([5, 6]))
    policy = LaserKVPolicy(keep_ratio=0.25, block_size=32, protection_divisor=2)
    with pytest.raises(ConfigError, match="G = B - 2\\*\\(B//n\\) = 0"):
        prefill_and_compress(LM(), policy, segments)


def test_spec_string_reaches_every_parameter():
    policy = load_policy(
        "laserkv:keep_ratio=0.1,block_size=2048,protection_divisor=5,alpha=0.5,"
        "lsh_mode=frequency_rank,lsh_vectors=query,lsh_bits=12,lsh_tables=20,seed=7,"
        "mode=recursive,lookback=false,redistribute=true"
    )
    comp = policy.compose()
    assert comp.engine.block_size == 2048 and comp.engine.position_mode == "original"
    b = comp.budgeter
    assert (b.keep_ratio, b.block_size, b.protection_divisor, b.mode, b.lookback) == (
        0.1,
        2048,
        5,
        "recursive",
        False,
    )
    lsh = comp.scorers["lsh"]
    assert (lsh.mode, lsh.vectors, lsh.n_bits, lsh.n_tables, lsh.seed) == (
        "frequency_rank",
        "query",
        12,
        20,
        7,
    )
    assert (comp.selector.alpha, comp.selector.redistribute) == (0.5, True)
    assert "2602.02199" in (type(policy).__doc__ or "")


# ---- hybrid selector on hand-made scores -------------------------------------------------------
class _FakeSource:
    """exact prefers low slots (10 - i); lsh prefers high slots, only slots 8, 9 'matched' (> 0)."""

    def __init__(self):
        self.lsh_candidates = []

    def scores(self, name, candidates):
        n = candidates.shape[-1]
        slots = torch.arange(n, dtype=torch.float32)
        if name == "exact":
            return (10 - slots).view(1, 1, n)
        self.lsh_candidates.append(candidates[0, 0].nonzero().flatten().tolist())
        lsh = torch.where(slots >= 8, slots, slots - 100)
        return lsh.masked_fill(~candidates[0, 0], float("-inf")).view(1, 1, n)


def _select(alpha, redistribute=False, k=6):
    from kvlab_plugins.hybrid import HybridSelector

    source = _FakeSource()
    cand = torch.zeros(1, 1, 12, dtype=torch.bool)
    cand[..., :10] = True  # slots 10, 11 are not candidates (e.g. the question)
    sel = HybridSelector(alpha=alpha, redistribute=redistribute).select(source, cand, k)
    return sel[0, 0].tolist(), source.lsh_candidates


def test_hybrid_split_is_disjoint_and_lsh_sees_only_the_rest():
    # k = 6, alpha = 0.5: primary = 3 by exact (slots 0, 1, 2); the other 3 by LSH among 3..9,
    # best LSH slots 9, 8, 7 (7 is filler: not matched, but no redistribution by default)
    kept, lsh_seen = _select(0.5)
    assert kept == [0, 1, 2, 7, 8, 9]
    assert lsh_seen == [list(range(3, 10))]


def test_hybrid_alpha_extremes_and_redistribute():
    assert _select(1.0) == ([0, 1, 2, 3, 4, 5], [])  # exact only, LSH never asked
    assert _select(0.0)[0] == [4, 5, 6, 7, 8, 9]  # LSH only
    # floor(0.75 * 6) = 4 exact (0..3); LSH share 2 = its two matched slots 8, 9
    assert _select(0.75)[0] == [0, 1, 2, 3, 8, 9]
    # alpha = 0.5 with redistribute: LSH keeps only matched 8, 9; its third slot goes to exact's
    # next best (3) instead of the filler 7
    assert _select(0.5, redistribute=True)[0] == [0, 1, 2, 3, 8, 9]
