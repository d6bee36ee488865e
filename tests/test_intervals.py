"""Intervals for quality claims: Wilson, percentile bootstrap, and paired differences with McNemar."""

import math

import numpy as np
import pytest

from h2o_vllm.evaluation.intervals import (
    Interval,
    PairedDifference,
    bootstrap_mean,
    mcnemar_exact,
    mean_interval,
    paired_difference,
    wilson,
)


def wilson_by_hand(successes, n, z=1.959963984540054):
    """The textbook formula, written out apart from the module's."""
    p = successes / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    return centre - half, centre + half


@pytest.mark.parametrize(
    "successes, n, low, high",
    [(0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634), (95, 100, 0.8882, 0.9785), (10, 10, 0.7225, 1.0)],
)
def test_wilson_known_values(successes, n, low, high):
    by_hand = wilson_by_hand(successes, n)
    assert by_hand == pytest.approx((low, high), abs=5e-5)
    interval = wilson(successes, n)
    assert (interval.low, interval.high) == pytest.approx((low, high), abs=5e-5)
    assert interval.estimate == successes / n
    assert interval.n == n and interval.method == "wilson"


@pytest.mark.parametrize("n", [1, 2, 7, 50, 1000])
def test_wilson_bounds_within_unit_interval(n):
    for successes in range(0, n + 1, max(1, n // 13)):
        interval = wilson(successes, n)
        assert 0.0 <= interval.low <= interval.estimate <= interval.high <= 1.0
    assert wilson(0, n).low == 0.0 and wilson(n, n).high == 1.0


def test_wilson_rejects_bad_counts():
    with pytest.raises(ValueError):
        wilson(0, 0)
    with pytest.raises(ValueError):
        wilson(11, 10)
    with pytest.raises(ValueError):
        wilson(-1, 10)
    with pytest.raises(ValueError):
        wilson(5, 10, confidence=1.0)


def test_wilson_narrows_with_lower_confidence():
    wide, narrow = wilson(30, 100, 0.99), wilson(30, 100, 0.80)
    assert wide.low < narrow.low and narrow.high < wide.high


def test_interval_formatting_and_excludes():
    interval = wilson(72, 100)
    assert str(interval) == "72.0% [62.5, 79.9] (n=100)"
    assert interval.format() == "72.0 [62.5, 79.9]"
    assert interval.format(scale=1, digits=3) == "0.720 [0.625, 0.799]"
    assert interval.excludes(0.5) and interval.excludes(0.85)
    assert not interval.excludes(0.72) and not interval.excludes(interval.low)
    assert str(Interval(12.5, 10.0, 15.0, 40, "bootstrap")) == "12.5 [10, 15] (n=40)"


def test_bootstrap_deterministic_per_seed_and_covers_mean():
    rng = np.random.default_rng(1)
    scores = rng.uniform(0, 1, size=200) ** 2
    first = bootstrap_mean(scores, seed=3)
    assert bootstrap_mean(list(scores), seed=3) == first
    assert bootstrap_mean(scores, seed=4) != first
    assert first.method == "bootstrap" and first.n == 200
    assert first.estimate == pytest.approx(scores.mean())
    assert first.low < first.estimate < first.high
    # A percentile interval of a mean of 200 cases is close to mean +- 1.96 standard errors.
    se = scores.std(ddof=1) / math.sqrt(scores.size)
    assert first.high - first.low == pytest.approx(2 * 1.96 * se, rel=0.1)


def test_bootstrap_chunks_and_degenerate_cases():
    # Enough cases that the resamples are drawn in several chunks.
    scores = np.linspace(0, 10, 5000)
    interval = bootstrap_mean(scores, resamples=1000, seed=0)
    assert interval.low < 5.0 < interval.high
    constant = bootstrap_mean([0.3] * 20)
    assert constant.low == constant.estimate == constant.high == pytest.approx(0.3)
    assert bootstrap_mean([7.0]).low == bootstrap_mean([7.0]).high == 7.0
    for bad in ([], [1.0, float("nan")], [[1.0, 2.0]]):
        with pytest.raises(ValueError):
            bootstrap_mean(bad)


def test_mean_interval_picks_the_method():
    assert mean_interval([1, 0, 1, 1]).method == "wilson"
    assert mean_interval([True, False, True]) == wilson(2, 3)
    assert mean_interval([1.0, 0.0, 0.0]) == wilson(1, 3)
    scores = [0.5, 1.0, 0.25, 0.0, 0.75]
    assert mean_interval(scores, seed=2) == bootstrap_mean(scores, seed=2)
    with pytest.raises(ValueError):
        mean_interval([])


def test_mcnemar_exact_known_table():
    expected = 2 * sum(math.comb(12, k) for k in range(3)) / 2**12
    assert expected == pytest.approx(0.0386, abs=5e-5)
    assert mcnemar_exact(10, 2) == pytest.approx(expected, rel=1e-12)
    assert mcnemar_exact(2, 10) == mcnemar_exact(10, 2)
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(3000, 2900) == pytest.approx(
        2 * sum(math.comb(5900, k) for k in range(2901)) / 2**5900, rel=1e-12
    )


def test_paired_difference_mcnemar_table():
    # 10 cases only a gets right, 2 only b, 30 both, 8 neither.
    a = [1] * 10 + [0] * 2 + [1] * 30 + [0] * 8
    b = [0] * 10 + [1] * 2 + [1] * 30 + [0] * 8
    diff = paired_difference(a, b)
    assert diff.method == "mcnemar"
    assert (diff.a_only, diff.b_only, diff.n) == (10, 2, 50)
    assert diff.estimate == pytest.approx(8 / 50)
    assert diff.p_value == pytest.approx(0.0385742, abs=1e-6)
    assert diff.low <= diff.estimate <= diff.high


def test_identical_inputs_show_no_difference():
    for scores in ([1, 0, 1, 1, 0] * 10, [0.2, 0.9, 0.4, 0.4] * 10):
        diff = paired_difference(scores, scores)
        assert diff.estimate == 0 and diff.low == 0 and diff.high == 0
        assert not diff.significant
        assert diff.p_value == 1.0
        assert diff.verdict("h2o", "full") == "h2o and full: no difference shown"


def test_clearly_better_a():
    a, b = [1] * 60 + [1] * 20 + [0] * 20, [0] * 60 + [1] * 20 + [0] * 20
    diff = paired_difference(a, b)
    assert diff.significant
    assert diff.estimate == pytest.approx(0.6) and diff.low > 0
    assert (diff.a_only, diff.b_only) == (60, 0)
    assert diff.p_value == pytest.approx(2 / 2**60)
    assert diff.verdict("h2o", "full") == "h2o better than full"
    reverse = paired_difference(b, a)
    assert reverse.significant and reverse.high < 0
    assert reverse.verdict("full", "h2o") == "h2o better than full"


def test_paired_bootstrap_for_continuous_scores():
    rng = np.random.default_rng(7)
    b = rng.uniform(0, 1, size=300)
    a = b + 0.05 + rng.normal(0, 0.05, size=300)
    diff = paired_difference(a, b, seed=1)
    assert diff.method == "paired-bootstrap" and diff.a_only is None and diff.b_only is None
    assert diff.significant and diff.low > 0
    assert diff.p_value == pytest.approx(2 / 10_001)
    assert paired_difference(a, b, seed=1) == diff
    # Pairing matters: the separate intervals are far wider than the paired one.
    separate = bootstrap_mean(a).high - bootstrap_mean(a).low
    assert diff.high - diff.low < separate / 3
    # Noise alone: not significant, p well above 0.05, and the p-value agrees with the interval.
    noise = paired_difference(b + rng.normal(0, 0.1, size=300), b, seed=1)
    assert not noise.significant and noise.p_value > 0.05
    assert noise.verdict("a", "b") == "a and b: no difference shown"


def test_bootstrap_p_value_matches_resampled_share():
    a = [0.9, 0.1, 0.6, 0.7, 0.3, 0.8, 0.5, 0.2]
    b = [0.7, 0.2, 0.5, 0.4, 0.35, 0.6, 0.55, 0.1]
    resamples = 2000
    diff = paired_difference(a, b, resamples=resamples, seed=5)
    d = np.subtract(a, b)
    rng = np.random.default_rng(5)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
    assert diff.estimate > 0
    assert diff.p_value == pytest.approx(min(1.0, 2 * (np.sum(means <= 0) + 1) / (resamples + 1)))


def test_paired_difference_rejects_bad_inputs():
    with pytest.raises(ValueError):
        paired_difference([1, 0, 1], [1, 0])
    with pytest.raises(ValueError):
        paired_difference([], [])
    with pytest.raises(ValueError):
        paired_difference([1.0], [float("inf")])


def test_paired_difference_formatting():
    diff = PairedDifference(0.03, 0.005, 0.055, 100, 0.021, "mcnemar", 10, 2)
    assert diff.format() == "+3.0 [0.5, 5.5]"
    assert str(diff) == "+0.03 [0.005, 0.055] (n=100, p=0.021, mcnemar 10/2)"
    assert diff.significant and diff.verdict("a", "b") == "a better than b"
    assert PairedDifference(-0.03, -0.05, -0.01, 100, 0.01, "paired-bootstrap", None, None).verdict("a", "b") == (
        "b better than a"
    )
