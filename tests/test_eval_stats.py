"""Paired statistics of `artaug eval`: hand computations, symmetry, and bootstrap coverage.

The coverage tests simulate data sets whose true mean difference and win rate are known and
count how often the 95% interval contains them; run with -s to see the figures.
"""

import math

import numpy as np
import pytest

from artaug_ext.errors import UsageError
from artaug_ext.eval import stats

COVERAGE_SETS, COVERAGE_BOOT = 500, 1000


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def test_win_rate_counts_ties_as_half():
    assert stats.win_rate([1, 2, 3, 3], [0, 2, 4, 3]) == (1 + 0.5 + 0 + 0.5) / 4
    assert stats.win_rate([5, 5], [1, 1]) == 1.0
    assert stats.win_rate([1, 1], [5, 5]) == 0.0


def test_preference_is_the_two_way_softmax():
    a, b = np.array([1.0, 0.0, 3.0, 21.5]), np.array([0.0, 0.0, 1.0, 22.25])
    hand = [math.exp(x) / (math.exp(x) + math.exp(y)) for x, y in zip(a, b, strict=True)]
    p = stats.pairwise_preference(a, b)
    np.testing.assert_allclose(p, hand, rtol=1e-12, atol=1e-15)
    assert p[1] == 0.5
    # Swapping the arms gives exactly 1 - p: the two arms' preferences sum to 100%.
    assert np.all(p + stats.pairwise_preference(b, a) == 1.0)


def test_preference_does_not_overflow():
    with np.errstate(over="raise", invalid="raise"):  # underflow of exp(-2000) to 0 is fine
        p = stats.pairwise_preference([1000.0, -1000.0, 0.0], [-1000.0, 1000.0, 0.0])
    assert p.tolist() == [1.0, 0.0, 0.5]


def test_mean_diff_and_row_by_hand():
    a, b = [3.0, 1.0, 2.0, 6.0], [1.0, 1.0, 3.0, 2.0]
    row = stats.summarize_metric(a, b, kind="preference", n_boot=200)
    assert row["mean_a"] == 3.0 and row["mean_b"] == 1.75
    assert row["mean_diff"] == pytest.approx((2 + 0 - 1 + 4) / 4)
    assert row["win_rate"] == (1 + 0.5 + 0 + 1) / 4
    hand = np.mean([1 / (1 + math.exp(y - x)) for x, y in zip(a, b, strict=True)])
    assert row["preference"] == pytest.approx(hand, abs=1e-15)
    assert (row["n"], row["prompts"]) == (4, 4)
    for name in ("diff_ci", "win_ci", "preference_ci"):
        low, high = row[name]
        assert low <= high
    assert "preference" not in stats.summarize_metric(a, b, kind="score", n_boot=50)


def test_symmetric_arms_give_exactly_one_half():
    rng = np.random.default_rng(3)
    x, y = rng.normal(6.5, 0.5, 40), rng.normal(6.5, 0.5, 40)
    x[:5] = y[:5]  # some ties too
    a, b = np.concatenate([x, y]), np.concatenate([y, x])  # every pair has its mirror
    groups = np.concatenate([np.arange(40), np.arange(40)])
    assert stats.win_rate(a, b) == 0.5
    row = stats.summarize_metric(a, b, groups=groups, kind="preference", n_boot=1000)
    assert row["win_rate"] == 0.5 and row["preference"] == 0.5 and row["mean_diff"] == pytest.approx(0, abs=1e-12)
    assert row["win_ci"][0] < 0.5 < row["win_ci"][1]
    assert row["preference_ci"][0] < 0.5 < row["preference_ci"][1]
    assert row["diff_ci"][0] < 0 < row["diff_ci"][1]
    for statistic in ("win_rate", "preference"):
        r = stats.paired_bootstrap(a, b, statistic=statistic)
        assert r["estimate"] == 0.5 and r["low"] < 0.5 < r["high"]


def test_bootstrap_is_deterministic_and_shared_with_the_row():
    rng = np.random.default_rng(4)
    b = rng.normal(size=30)
    a = b + rng.normal(0.2, 1, 30)
    groups = np.repeat(np.arange(10), 3)
    one = stats.paired_bootstrap(a, b, groups=groups, statistic="win_rate", seed=7)
    assert one == stats.paired_bootstrap(a, b, groups=groups, statistic="win_rate", seed=7)
    diff = stats.paired_bootstrap(a, b, groups=groups, seed=7)
    assert diff["low"] != stats.paired_bootstrap(a, b, groups=groups, seed=8)["low"]
    assert one["prompts"] == 10 and one["n"] == 30
    row = stats.summarize_metric(a, b, groups=groups, kind="preference", seed=7)
    assert row["win_ci"] == pytest.approx((one["low"], one["high"]))
    pref = stats.paired_bootstrap(a, b, groups=groups, statistic="preference", seed=7)
    assert row["preference_ci"] == pytest.approx((pref["low"], pref["high"]))


def test_nested_bootstrap_keeps_each_prompt_with_its_own_seeds():
    """Unequal seed counts: prompt 0 has one pair (diff 100), prompt 1 five (diff 0). A
    replicate draws 2 prompts, so its mean is 100 (0 twice), 100/6 (one each) or 0 (1 twice);
    padding counted as pairs would give other values."""
    values = np.array([[100.0, 0, 0, 0, 0, 0]])
    codes = np.array([0, 1, 1, 1, 1, 1])
    reps = stats._bootstrap_means(values, codes, 400, seed=0)[:, 0]
    assert set(np.round(reps, 9)) == {0.0, round(100 / 6, 9), 100.0}
    # Unsorted group labels mean the same prompts.
    shuffled = np.array([3, 9, 3, 9, 9, 9])
    r = stats.paired_bootstrap([100.0, 0, 1, 0, 0, 0], [0.0] * 6, groups=shuffled, n_boot=300)
    assert r["prompts"] == 2 and r["low"] <= r["estimate"] <= r["high"]


def test_coverage_of_pair_bootstrap():
    """a - b ~ Normal(0.3, 1), n = 60: true mean diff 0.3, true win rate Phi(0.3).

    Percentile intervals run a little narrow at n = 60 (about 94% expected; 2000 sets measured
    94.0% and 94.9%), and 500 sets carry a binomial SD of about 1%, so the 92-98% band is about
    two SDs below; the fixed seed makes the check deterministic."""
    rng = np.random.default_rng(1)
    true_diff, true_win = 0.3, _phi(0.3)
    hits = {"mean_diff": 0, "win_rate": 0}
    for i in range(COVERAGE_SETS):
        b = rng.normal(6.3, 0.5, 60)
        a = b + rng.normal(true_diff, 1.0, 60)
        row = stats.summarize_metric(a, b, n_boot=COVERAGE_BOOT, seed=i)
        hits["mean_diff"] += row["diff_ci"][0] <= true_diff <= row["diff_ci"][1]
        hits["win_rate"] += row["win_ci"][0] <= true_win <= row["win_ci"][1]
    coverage = {k: v / COVERAGE_SETS for k, v in hits.items()}
    print(f"\ncoverage of 95% intervals, {COVERAGE_SETS} sets of 60 pairs: {coverage}")
    for value in coverage.values():
        assert 0.92 <= value <= 0.98, coverage


def test_coverage_of_nested_bootstrap():
    """20 prompts x 3 seeds, diff = 0.3 + prompt effect N(0, 1) + seed noise N(0, 1). The nested
    interval covers 0.3 about 95% of the time; resampling pairs alone (ignoring that seeds of a
    prompt share its effect) gives far too narrow an interval. (3000 sets measured the nested
    coverage at 94.2%; this seed's 500 give about 93%.)"""
    rng = np.random.default_rng(2025)
    prompts, seeds, true_diff = 20, 3, 0.3
    groups = np.repeat(np.arange(prompts), seeds)
    nested = pairs = 0
    for i in range(COVERAGE_SETS):
        effect = rng.normal(0.0, 1.0, prompts)[groups]
        b = rng.normal(6.3, 0.5, prompts * seeds)
        a = b + true_diff + effect + rng.normal(0.0, 1.0, prompts * seeds)
        r = stats.paired_bootstrap(a, b, groups=groups, n_boot=COVERAGE_BOOT, seed=i)
        nested += r["low"] <= true_diff <= r["high"]
        r = stats.paired_bootstrap(a, b, n_boot=COVERAGE_BOOT, seed=i)
        pairs += r["low"] <= true_diff <= r["high"]
    coverage = {"nested mean_diff": nested / COVERAGE_SETS, "pairs only mean_diff": pairs / COVERAGE_SETS}
    print(f"\ncoverage of 95% intervals, {COVERAGE_SETS} sets of {prompts} prompts x {seeds} seeds: {coverage}")
    assert 0.92 <= coverage["nested mean_diff"] <= 0.98, coverage
    assert coverage["pairs only mean_diff"] < 0.9, coverage


@pytest.mark.parametrize("a, b, kwargs", [
    ([[1.0, 2.0]], [[1.0, 2.0]], {}),  # 2-D
    ([1.0, 2.0, 3.0], [1.0, 2.0], {}),  # unpaired
    ([1.0], [2.0], {}),  # one pair
    ([1.0, float("nan")], [1.0, 2.0], {}),
    ([1.0, 2.0], [1.0, float("inf")], {}),
    ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], {"groups": [0, 1]}),  # groups of the wrong length
    ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], {"groups": [0.5, 1.0, 1.0]}),  # not prompt indices
    ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], {"groups": [4, 4, 4]}),  # one prompt
    ([1.0, 2.0], [1.0, 2.0], {"statistic": "median"}),
    ([1.0, 2.0], [1.0, 2.0], {"n_boot": 0}),
    ([1.0, 2.0], [1.0, 2.0], {"level": 95}),
])
def test_bad_inputs_raise_usage_error(a, b, kwargs):
    with pytest.raises(UsageError) as caught:
        stats.paired_bootstrap(a, b, **kwargs)
    assert "\n" not in str(caught.value)
    if "statistic" not in kwargs:
        with pytest.raises(UsageError):
            stats.summarize_metric(a, b, **kwargs)


def test_bad_kind_and_win_rate_input():
    with pytest.raises(UsageError):
        stats.summarize_metric([1.0, 2.0], [1.0, 2.0], kind="pickscore")
    with pytest.raises(UsageError):
        stats.win_rate([1.0, 2.0], [1.0])
    assert issubclass(UsageError, ValueError)
