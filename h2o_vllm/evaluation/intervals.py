"""Confidence intervals for quality scores, and paired comparisons of two configurations on the same cases.

A quality claim is a mean score over cases together with its 95% interval; a claim that one configuration beats
another is a paired difference over the same cases, with an interval and a p-value.

Methods:

* ``wilson``: the Wilson score interval for a binomial proportion (Wilson 1927), for 0/1 scores such as
  pass-key exact match. Unlike the Wald interval it keeps its coverage near 0 and 1 and never leaves [0, 1]
  (Brown, Cai & DasGupta 2001).
* ``bootstrap_mean``: the percentile bootstrap interval of the mean (Efron & Tibshirani 1993, ch. 13), for
  scores that are not 0/1 (ROUGE-L, matched tokens).
* ``paired_difference``: the paired percentile bootstrap of mean(a - b), resampling cases jointly so that the
  correlation between the two configurations on a case is kept. Its p-value is the exact McNemar test
  (McNemar 1947) in its exact binomial form when every score is 0/1: under no difference, the count of
  discordant pairs in which only ``a`` is right is Binomial(discordant, 1/2). Otherwise it is the bootstrap
  p-value read off the same resampled differences (Efron & Tibshirani 1993, ch. 15-16).

Every method assumes the cases are independent draws from the population the claim is about. Cases that share
a source (several questions on one document, one prompt at several lengths) are clustered, and these intervals
are then too narrow; resample the clusters instead. The percentile bootstrap also under-covers for small n
(roughly below 20-30 cases), most for skewed scores.

References:
    Wilson, E. B. (1927). Probable inference, the law of succession, and statistical inference.
        Journal of the American Statistical Association 22(158), 209-212.
    Efron, B. & Tibshirani, R. J. (1993). An Introduction to the Bootstrap. Chapman & Hall.
    McNemar, Q. (1947). Note on the sampling error of the difference between correlated proportions or
        percentages. Psychometrika 12(2), 153-157.
    Brown, L. D., Cai, T. T. & DasGupta, A. (2001). Interval estimation for a binomial proportion.
        Statistical Science 16(2), 101-133.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

# Resampled indices held at once: 2**20 int64 indices plus as many gathered scores, 16 MiB in all.
_CHUNK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class Interval:
    """A mean score with its confidence interval.

    estimate: the mean score over the ``n`` cases (for 0/1 scores, the rate), in the unit of the scores.
    low, high: the interval's bounds, in the same unit.
    method: ``"wilson"`` (0/1 scores) or ``"bootstrap"`` (percentile bootstrap of the mean).
    """

    estimate: float
    low: float
    high: float
    n: int
    method: str

    def excludes(self, value: float) -> bool:
        """Whether ``value`` lies outside [low, high]: the data reject it at the interval's confidence level."""
        return value < self.low or value > self.high

    def format(self, scale: float = 100.0, digits: int = 1) -> str:
        """``"72.0 [62.5, 79.9]"``: estimate and bounds times ``scale`` (100 for percent), ``digits`` decimals."""
        e, lo, hi = (scale * x for x in (self.estimate, self.low, self.high))
        return f"{e:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"

    def __str__(self) -> str:
        """A rate (Wilson) in percent, ``"72.0% [62.5, 79.9] (n=100)"``; a bootstrap mean in the scores' unit,
        ``"0.4123 [0.3811, 0.4432] (n=100)"``: nothing in a mean says whether its scores are fractions."""
        if self.method == "wilson":
            e, lo, hi = (100 * x for x in (self.estimate, self.low, self.high))
            return f"{e:.1f}% [{lo:.1f}, {hi:.1f}] (n={self.n})"
        return f"{self.estimate:.4g} [{self.low:.4g}, {self.high:.4g}] (n={self.n})"


@dataclass(frozen=True)
class PairedDifference:
    """Configuration ``a`` against ``b`` on the same cases.

    estimate: mean(a - b) over the paired cases, in the unit of the scores (for 0/1 scores, the difference in
        rates).
    low, high: the paired percentile bootstrap interval of that mean.
    p_value: two-sided p-value for "no difference": exact McNemar for 0/1 scores (method ``"mcnemar"``), else
        the paired bootstrap p-value (method ``"paired-bootstrap"``).
    a_only, b_only: for 0/1 scores, the discordant pairs (a right and b wrong; b right and a wrong); else None.

    ``significant`` and ``verdict`` read the interval, not the p-value. For 0/1 scores the two come from
    different methods (bootstrap interval, McNemar test) and can disagree when the evidence is marginal; the
    bootstrap p-value is read off the same resamples as the interval and agrees with it up to how quantiles
    are interpolated.
    """

    estimate: float
    low: float
    high: float
    n: int
    p_value: float
    method: str
    a_only: int | None
    b_only: int | None

    @property
    def significant(self) -> bool:
        """Whether the interval excludes 0: a difference is shown at the interval's confidence level."""
        return self.low > 0 or self.high < 0

    def verdict(self, a: str, b: str) -> str:
        """``"<a> better than <b>"`` when the whole interval is above 0, ``"<b> better than <a>"`` when it is
        below 0, else ``"<a> and <b>: no difference shown"`` (which is not evidence that they are equal)."""
        if self.low > 0:
            return f"{a} better than {b}"
        if self.high < 0:
            return f"{b} better than {a}"
        return f"{a} and {b}: no difference shown"

    def format(self, scale: float = 100.0, digits: int = 1) -> str:
        """``"+3.0 [0.5, 5.5]"``: the difference and its bounds times ``scale``, ``digits`` decimals."""
        e, lo, hi = (scale * x for x in (self.estimate, self.low, self.high))
        return f"{e:+.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"

    def __str__(self) -> str:
        """``"+0.03 [0.005, 0.055] (n=100, p=0.021, mcnemar 10/2)"``, in the unit of the scores."""
        tail = f", {self.method} {self.a_only}/{self.b_only}" if self.a_only is not None else f", {self.method}"
        return f"{self.estimate:+.4g} [{self.low:.4g}, {self.high:.4g}] (n={self.n}, p={self.p_value:.3g}{tail})"


def _z(confidence: float) -> float:
    """The standard normal quantile for a two-sided ``confidence`` (1.96 for 0.95)."""
    _check_confidence(confidence)
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, not {confidence}")


def _scores(scores: Sequence[float], name: str = "scores") -> np.ndarray:
    """Scores as a 1-D float array; ValueError when empty, not 1-D or not finite."""
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, not of shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{name} is empty: an interval needs at least one case")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} holds NaN or infinite values")
    return x


def _binary(x: np.ndarray) -> bool:
    return bool(np.all((x == 0) | (x == 1)))


def _bootstrap_means(x: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Means of ``resamples`` resamples of ``x`` with replacement, drawn in chunks of rows.

    Deterministic for a given ``seed``, length of ``x`` and ``resamples``.
    """
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, not {resamples}")
    n = x.size
    rng = np.random.default_rng(seed)
    rows = max(1, min(resamples, _CHUNK_ELEMENTS // n))
    means = np.empty(resamples, dtype=np.float64)
    for start in range(0, resamples, rows):
        stop = min(start + rows, resamples)
        indices = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = x[indices].mean(axis=1)
    return means


def _percentile_bounds(means: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def wilson(successes: int, n: int, confidence: float = 0.95) -> Interval:
    """Wilson score interval for a proportion: ``successes`` out of ``n`` independent 0/1 cases.

    Returns an Interval whose estimate is the observed rate ``successes / n`` (not the interval's centre, which
    is pulled towards 1/2) and whose bounds lie in [0, 1]; 0 and 1 exactly when no case or every case succeeds.
    Use it for a rate (exact match, pass/fail); its coverage stays close to nominal down to small n and near
    rates of 0 or 1, where the Wald interval fails. ValueError when n < 1 or successes is outside [0, n].
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, not {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n={n}], not {successes}")
    z = _z(confidence)
    p = successes / n
    z2n = z * z / n
    centre = (p + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * math.sqrt(p * (1 - p) / n + z2n / (4 * n))
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return Interval(estimate=p, low=low, high=high, n=n, method="wilson")


def bootstrap_mean(
    scores: Sequence[float], confidence: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> Interval:
    """Percentile bootstrap interval of the mean of ``scores``, one score per independent case.

    Returns an Interval whose estimate is the sample mean and whose bounds are the (1 - confidence)/2 and
    (1 + confidence)/2 quantiles of ``resamples`` means of resamples drawn with replacement. The same seed,
    scores and resamples give the same interval. Use it for scores that are not 0/1 (ROUGE-L, matched tokens);
    for 0/1 scores prefer ``wilson``, since the bootstrap collapses to a point when every score is equal.
    Needs roughly 20-30 cases or more to be trusted. ValueError when ``scores`` is empty or not finite.
    """
    _check_confidence(confidence)
    x = _scores(scores)
    low, high = _percentile_bounds(_bootstrap_means(x, resamples, seed), confidence)
    estimate = float(x.mean())
    # Quantiles of means computed in floating point can stray past the mean by an ulp when every score is equal.
    return Interval(estimate=estimate, low=min(low, estimate), high=max(high, estimate), n=x.size, method="bootstrap")


def mean_interval(scores: Sequence[float], confidence: float = 0.95, seed: int = 0) -> Interval:
    """Interval of the mean score, by the method that fits the scores.

    Returns ``wilson`` when every score is 0 or 1 (booleans included), else ``bootstrap_mean`` with 10,000
    resamples and the given seed. ValueError when ``scores`` is empty or not finite.
    """
    x = _scores(scores)
    if _binary(x):
        return wilson(int(x.sum()), x.size, confidence)
    return bootstrap_mean(x, confidence=confidence, seed=seed)


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts.

    Under no difference, ``a_only`` is Binomial(a_only + b_only, 1/2); the p-value is twice the smaller tail,
    capped at 1, and 1 when there are no discordant pairs. Computed in exact integer arithmetic.
    """
    if a_only < 0 or b_only < 0:
        raise ValueError(f"discordant counts must be non-negative, not {a_only} and {b_only}")
    m = a_only + b_only
    k = min(a_only, b_only)
    if m == 0:
        return 1.0
    term = total = 1
    for i in range(1, k + 1):
        term = term * (m - i + 1) // i
        total += term
    return min(1.0, 2 * total / 2**m)


def paired_difference(
    a: Sequence[float],
    b: Sequence[float],
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> PairedDifference:
    """Difference between configurations ``a`` and ``b`` scored on the same cases: ``a[i]`` and ``b[i]`` are
    the two scores of case ``i``.

    Returns a PairedDifference whose estimate is mean(a - b) and whose interval is the paired percentile
    bootstrap: case indices are resampled once for both configurations, which is resampling the per-case
    differences, so the within-case correlation that makes a paired comparison sharper than two separate
    intervals is kept. The p-value is the exact McNemar test when every score of both is 0 or 1, with the
    discordant counts in ``a_only`` and ``b_only``. Otherwise it is the paired bootstrap p-value: the share of
    resampled mean differences at or beyond 0 on the side opposite the estimate, as (count + 1) / (resamples + 1),
    doubled and capped at 1 (1 when the estimate is 0). That p-value inverts the percentile interval; it is not
    a test that resamples under the null, and it cannot go below 2 / (resamples + 1).

    Use it whenever two configurations ran on the same cases: comparing their separate intervals for overlap
    wastes the pairing and is too conservative. ValueError when the lengths differ, the inputs are empty, or
    a score is not finite.
    """
    _check_confidence(confidence)
    xa, xb = _scores(a, "a"), _scores(b, "b")
    if xa.size != xb.size:
        raise ValueError(f"a and b must score the same cases: {xa.size} scores against {xb.size}")
    d = xa - xb
    estimate = float(d.mean())
    means = _bootstrap_means(d, resamples, seed)
    low, high = _percentile_bounds(means, confidence)
    low, high = min(low, estimate), max(high, estimate)
    if _binary(xa) and _binary(xb):
        a_only = int(np.sum((xa == 1) & (xb == 0)))
        b_only = int(np.sum((xa == 0) & (xb == 1)))
        p = mcnemar_exact(a_only, b_only)
        return PairedDifference(estimate, low, high, d.size, p, "mcnemar", a_only, b_only)
    if estimate == 0:
        p = 1.0
    else:
        beyond = int(np.sum(means <= 0)) if estimate > 0 else int(np.sum(means >= 0))
        p = min(1.0, 2 * (beyond + 1) / (resamples + 1))
    return PairedDifference(estimate, low, high, d.size, p, "paired-bootstrap", None, None)
