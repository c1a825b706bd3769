"""Intervals and paired verdicts against hand-worked and textbook values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kvpress_lab.compare.stats import (
    bootstrap_mean_interval,
    mean_interval,
    paired_comparison,
    wilson_interval,
)

Z = 1.959963985  # the 97.5 % normal quantile


def test_wilson_interval_for_seven_of_ten():
    # Wilson (1927) by hand: centre (k + z^2/2) / (n + z^2) = 8.92073 / 13.84146 = 0.644493,
    # half-width z * sqrt(k (n - k) / n + z^2 / 4) / (n + z^2) = 1.96 * sqrt(2.1 + 0.960366)
    # / 13.84146 = 0.247715 -> [0.3968, 0.8922] (the textbook value for 7/10)
    got = wilson_interval(7, 10)
    assert (got.estimate, got.n, got.method) == (0.7, 10, "wilson")
    assert got.low == pytest.approx(0.3968, abs=1e-4)
    assert got.high == pytest.approx(0.8922, abs=1e-4)
    centre = (7 + Z**2 / 2) / (10 + Z**2)
    half = Z * math.sqrt(7 * 3 / 10 + Z**2 / 4) / (10 + Z**2)
    assert (got.low, got.high) == pytest.approx((centre - half, centre + half), abs=1e-9)


def test_wilson_interval_at_the_edges():
    # 0/10: [0, z^2 / (n + z^2)] = [0, 3.841459 / 13.841459] = [0, 0.2775]; 10/10 mirrors it
    none = wilson_interval(0, 10)
    assert none.low == pytest.approx(0.0, abs=1e-12)
    assert none.high == pytest.approx(0.2775, abs=1e-4)
    every = wilson_interval(10, 10)
    assert (every.low, every.high) == pytest.approx((1 - 0.2775, 1.0), abs=1e-4)
    # 3/3 is far from certain: [0.4385, 1] (z^2 / (3 + z^2) = 0.5615 below 1)
    assert wilson_interval(3, 3).low == pytest.approx(0.4385, abs=1e-4)
    assert math.isnan(wilson_interval(0, 0).low)
    with pytest.raises(ValueError, match="successes=11"):
        wilson_interval(11, 10)


def test_cells_with_zero_one_scores_use_wilson_partial_credit_a_bootstrap():
    binary = mean_interval([1, 1, 1, 1, 1, 1, 1, 0, 0, 0])
    assert binary.method == "wilson"
    assert (binary.low, binary.high) == pytest.approx((0.3968, 0.8922), abs=1e-4)
    partial = mean_interval([1, 0.5, 0, 1, 1, 0.5, 0, 1, 1, 1])
    assert partial.method == "bootstrap" and partial.estimate == pytest.approx(0.7)


def test_bootstrap_interval_is_close_to_the_normal_theory_one_and_reproducible():
    # 100 values, 20 each of 0, .25, .5, .75, 1: mean 0.5, population sd sqrt(0.125) = 0.35355,
    # standard error 0.035355 -> normal 95 % interval 0.5 +/- 0.0693 = [0.4307, 0.5693]; the
    # percentile bootstrap agrees to within resampling noise
    values = [0, 0.25, 0.5, 0.75, 1.0] * 20
    got = bootstrap_mean_interval(values, seed=0)
    assert got.estimate == pytest.approx(0.5)
    assert got.low == pytest.approx(0.4307, abs=0.008)
    assert got.high == pytest.approx(0.5693, abs=0.008)
    # partial credit on 25 distinct values: the same seed gives the same interval, another
    # seed other resamples (so slightly different bounds)
    spread = [(i * 0.618034) % 1 for i in range(25)]
    first = bootstrap_mean_interval(spread, seed=0)
    again = bootstrap_mean_interval(spread, seed=0)
    assert (again.low, again.high) == (first.low, first.high)
    other = bootstrap_mean_interval(spread, seed=1)
    assert (other.low, other.high) != (first.low, first.high)
    assert other.low == pytest.approx(first.low, abs=0.02)


def test_bootstrap_without_spread_or_data():
    flat = bootstrap_mean_interval([0.5, 0.5, 0.5])
    assert (flat.low, flat.high) == (0.5, 0.5)
    one = bootstrap_mean_interval([0.25])
    assert one.estimate == 0.25 and math.isnan(one.low) and math.isnan(one.high)
    assert bootstrap_mean_interval([]).n == 0


def test_clearly_better_and_clearly_worse():
    # a right on all 30 samples, b on the first 5 only: 25 wins, no losses. Sign test by hand:
    # p = 2 * 0.5^25 = 5.96e-8. Mean difference 25/30 = 0.8333; its bootstrap interval is
    # about 0.833 +/- 1.96 * sqrt(0.8333 * 0.1667 / 30) = [0.70, 0.97]
    a = [1.0] * 30
    b = [1.0] * 5 + [0.0] * 25
    better = paired_comparison(a, b)
    assert better.verdict == "better"
    assert (better.wins, better.losses) == (25, 0)
    assert better.sign_test_p == pytest.approx(2 * 0.5**25)
    assert better.difference.estimate == pytest.approx(25 / 30)
    assert better.difference.low == pytest.approx(0.70, abs=0.04)
    assert better.difference.high == pytest.approx(0.97, abs=0.04)
    worse = paired_comparison(b, a)
    assert worse.verdict == "worse"
    assert worse.difference.estimate == pytest.approx(-25 / 30)
    assert worse.difference.high < 0


def test_indistinguishable_policies():
    # 30 samples, a wins on 3 and loses on 3: mean difference 0, sign test p = 1
    a = [1.0] * 3 + [0.0] * 3 + [1.0] * 12 + [0.0] * 12
    b = [0.0] * 3 + [1.0] * 3 + [1.0] * 12 + [0.0] * 12
    same = paired_comparison(a, b)
    assert same.verdict == "no detectable difference at n=30"
    assert same.difference.estimate == 0.0
    assert same.difference.low < 0 < same.difference.high
    assert same.sign_test_p == pytest.approx(1.0)
    identical = paired_comparison(a, a)
    assert identical.verdict == "no detectable difference at n=30"
    assert (identical.difference.low, identical.difference.high) == (0.0, 0.0)


def test_three_out_of_three_is_not_enough():
    # the bootstrap interval of three +1 differences is [1, 1], but a sign test on 3 wins gives
    # p = 2 * 0.5^3 = 0.25: three samples cannot rank two policies
    small = paired_comparison([1, 1, 1], [0, 0, 0])
    assert (small.difference.low, small.difference.high) == (1.0, 1.0)
    assert small.sign_test_p == pytest.approx(0.25)
    assert small.verdict.startswith("no detectable difference at n=3")
    assert "p=0.25" in small.verdict
    # six of six: p = 2 * 0.5^6 = 0.03125 < 0.05 -> better
    assert paired_comparison([1] * 6, [0] * 6).verdict == "better"


def test_pairing_removes_the_spread_between_samples():
    # b varies a lot from sample to sample, a is b + 0.1 on every sample: unpaired intervals of
    # the two means overlap, the paired difference is exactly 0.1 on each sample
    rng = np.random.default_rng(5)
    b = rng.uniform(0, 0.9, size=20)
    a = b + 0.1
    ia, ib = bootstrap_mean_interval(a), bootstrap_mean_interval(b)
    assert ia.low < ib.high  # the cells' own intervals cannot separate them
    paired = paired_comparison(a, b)
    assert paired.difference.estimate == pytest.approx(0.1)
    assert paired.verdict == "better"


def test_paired_scores_must_cover_the_same_samples():
    with pytest.raises(ValueError, match="same samples"):
        paired_comparison([1, 0], [1])
    assert paired_comparison([], []).verdict == "no samples in common"
