"""Uncertainty of comparison results: intervals per cell and paired differences between policies.

Every number a comparison shows comes from a handful of samples, so each one carries a 95 %
interval computed with :mod:`scipy.stats`:

- a cell's accuracy: the Wilson score interval when every score is 0 or 1
  (``binomtest(...).proportion_ci(method="wilson")``), else a percentile bootstrap of the mean
  (``scipy.stats.bootstrap``), for partial-credit scores such as RULER's ``string_match_all``;
- the difference between two policies: every policy runs on the same samples, so the difference
  is paired per sample and its interval is a paired bootstrap of the mean difference.

A verdict says "better" or "worse" only when the paired interval excludes 0 *and* an exact
two-sided sign test on the samples where the two policies differ agrees at the same level
(``binomtest(wins, wins + losses, 0.5)``). The bootstrap alone is over-confident with few
samples: three wins out of three give a bootstrap interval of [1, 1], while the sign test's
p = 0.25 says three samples cannot tell. Anything else is "no detectable difference at n=..."
(followed by the sign test's p when the interval alone excludes 0).

Bootstraps draw from a generator seeded with ``seed``, so the same scores give the same
interval on every run.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import attrs
import numpy as np
from scipy import stats

__all__ = [
    "CONFIDENCE",
    "Interval",
    "PairedComparison",
    "bootstrap_mean_interval",
    "mean_interval",
    "paired_comparison",
    "wilson_interval",
]

CONFIDENCE = 0.95
N_RESAMPLES = 9999
SEED = 0


@attrs.frozen
class Interval:
    """An estimate with its confidence interval (``nan`` bounds when there is no data)."""

    estimate: float
    low: float
    high: float
    n: int
    method: str  # "wilson", "bootstrap" or "none"

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


@attrs.frozen
class PairedComparison:
    """``a - b`` over the samples both were run on: the mean difference, its interval, a verdict."""

    difference: Interval
    wins: int  # samples where a scored higher than b
    losses: int  # samples where a scored lower
    sign_test_p: float
    verdict: str  # "better", "worse" or "no detectable difference at n=..."


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence!r} must lie in (0, 1)")


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> Interval:
    """Wilson score interval of a proportion ``successes / n``."""
    _check_confidence(confidence)
    if n <= 0:
        return Interval(math.nan, math.nan, math.nan, 0, "none")
    if not 0 <= successes <= n:
        raise ValueError(f"successes={successes} must lie in [0, n={n}]")
    ci = stats.binomtest(int(successes), int(n)).proportion_ci(
        confidence_level=confidence, method="wilson"
    )
    return Interval(successes / n, float(ci.low), float(ci.high), int(n), "wilson")


def _rng_argument(seed: int) -> dict:
    """scipy >= 1.15 takes ``rng``; older releases take ``random_state``."""
    generator = np.random.default_rng(seed)
    if "rng" in inspect.signature(stats.bootstrap).parameters:
        return {"rng": generator}
    return {"random_state": generator}  # pragma: no cover - scipy < 1.15


def _bootstrap(data: tuple, statistic, paired: bool, confidence: float, seed: int):
    return stats.bootstrap(
        data,
        statistic,
        paired=paired,
        vectorized=True,
        n_resamples=N_RESAMPLES,
        confidence_level=confidence,
        method="percentile",
        **_rng_argument(seed),
    ).confidence_interval


def _mean(x, axis=-1):
    return np.mean(x, axis=axis)


def _mean_difference(a, b, axis=-1):
    return np.mean(a - b, axis=axis)


def bootstrap_mean_interval(
    values: Sequence[float], confidence: float = CONFIDENCE, seed: int = SEED
) -> Interval:
    """Percentile-bootstrap interval of the mean of ``values``.

    With fewer than two values there is nothing to resample: the bounds are ``nan``. When every
    value is the same the resamples are too, and the interval has width 0.
    """
    _check_confidence(confidence)
    x = np.asarray(list(values), dtype=float)
    if x.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0, "none")
    estimate = float(x.mean())
    if x.size < 2:
        return Interval(estimate, math.nan, math.nan, 1, "bootstrap")
    if np.all(x == x[0]):
        return Interval(estimate, estimate, estimate, int(x.size), "bootstrap")
    ci = _bootstrap((x,), _mean, False, confidence, seed)
    return Interval(estimate, float(ci.low), float(ci.high), int(x.size), "bootstrap")


def _binary(x: np.ndarray) -> bool:
    return bool(np.all((x == 0) | (x == 1)))


def mean_interval(
    scores: Sequence[float], confidence: float = CONFIDENCE, seed: int = SEED
) -> Interval:
    """A cell's accuracy with its interval: Wilson for 0/1 scores, bootstrap otherwise."""
    x = np.asarray(list(scores), dtype=float)
    if x.size and _binary(x):
        return wilson_interval(int(x.sum()), int(x.size), confidence)
    return bootstrap_mean_interval(x, confidence, seed)


def paired_comparison(
    a: Sequence[float],
    b: Sequence[float],
    confidence: float = CONFIDENCE,
    seed: int = SEED,
) -> PairedComparison:
    """Compare ``a`` with ``b``, two score lists over the same samples in the same order."""
    _check_confidence(confidence)
    xa = np.asarray(list(a), dtype=float)
    xb = np.asarray(list(b), dtype=float)
    if xa.shape != xb.shape:
        raise ValueError(f"paired scores need the same samples: {xa.size} vs {xb.size} scores")
    n = int(xa.size)
    if n == 0:
        empty = Interval(math.nan, math.nan, math.nan, 0, "none")
        return PairedComparison(empty, 0, 0, math.nan, "no samples in common")
    d = xa - xb
    estimate = float(d.mean())
    if n < 2:
        diff = Interval(estimate, math.nan, math.nan, 1, "paired bootstrap")
    elif np.all(d == d[0]):
        diff = Interval(estimate, estimate, estimate, n, "paired bootstrap")
    else:
        ci = _bootstrap((xa, xb), _mean_difference, True, confidence, seed)
        diff = Interval(estimate, float(ci.low), float(ci.high), n, "paired bootstrap")
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    p = stats.binomtest(wins, wins + losses, 0.5).pvalue if wins + losses else 1.0
    alpha = 1 - confidence
    if diff.low > 0 and p < alpha:
        verdict = "better"
    elif diff.high < 0 and p < alpha:
        verdict = "worse"
    else:
        verdict = f"no detectable difference at n={n}"
        if diff.low > 0 or diff.high < 0:  # the interval alone would have ranked them
            verdict += f" (sign test p={p:.2g})"
    return PairedComparison(diff, wins, losses, float(p), verdict)
