"""The statistics primitives against hand computations and second implementations."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.statistics import (bootstrap_mean_ci, difference_noise_sd, factor_verdicts, format_p, holm,
                                 paired_wilcoxon, pooled_seed_sd, rank_biserial, seed_sd, within_noise)
from tests.analysis.conftest import reference_bootstrap


def test_bootstrap_ci_equals_a_direct_numpy_percentile_bootstrap():
    values = np.random.default_rng(7).uniform(0.3, 0.95, size=37)
    ci = bootstrap_mean_ci(values, seed=11)
    low, high = reference_bootstrap(values, seed=11)
    assert ci.mean == pytest.approx(values.mean(), abs=1e-12)
    assert (ci.low, ci.high) == pytest.approx((low, high), abs=1e-12)
    assert ci.n == 37 and ci.n_missing == 0
    assert ci.low < ci.mean < ci.high


def test_bootstrap_ci_is_scipys_percentile_bootstrap():
    """bootstrap_mean_ci is scipy.stats.bootstrap (percentile) with the same seeded generator."""
    values = np.random.default_rng(3).normal(0.7, 0.1, size=60)
    ci = bootstrap_mean_ci(values, seed=0)
    reference = stats.bootstrap((values,), np.mean, n_resamples=2000, method="percentile",
                                confidence_level=0.95, rng=np.random.default_rng(0)).confidence_interval
    assert ci.low == pytest.approx(reference.low, abs=1e-12)
    assert ci.high == pytest.approx(reference.high, abs=1e-12)


def test_bootstrap_leaves_out_and_counts_undefined_values():
    values = [4.0, np.nan, 6.0, np.inf, 8.0]
    ci = bootstrap_mean_ci(values, seed=0)
    assert (ci.n, ci.n_missing) == (3, 2)
    assert ci.mean == pytest.approx(6.0)
    assert (ci.low, ci.high) == pytest.approx(reference_bootstrap([4.0, 6.0, 8.0], seed=0))
    single = bootstrap_mean_ci([0.5])
    assert (single.mean, single.low, single.high) == (0.5, 0.5, 0.5)
    empty = bootstrap_mean_ci([np.nan, np.nan])
    assert empty.n == 0 and empty.n_missing == 2 and math.isnan(empty.mean)


@pytest.mark.parametrize("p, expected", [
    ([0.01, 0.04, 0.03], [0.03, 0.06, 0.06]),           # the worked example in holm's docstring
    ([0.5, 0.01, np.nan, 0.02], [0.5, 0.03, np.nan, 0.04]),  # NaN is not a test: m = 3
    ([0.6, 0.7], [1.0, 1.0]),                           # capped at 1
    ([0.04], [0.04]),                                   # one test: unchanged
    ([0.02, 0.02, 0.02, 0.02], [0.08, 0.08, 0.08, 0.08]),  # ties
])
def test_holm_against_hand_computation(p, expected):
    np.testing.assert_allclose(holm(p), expected, rtol=0, atol=1e-12)


def test_holm_equals_the_step_down_definition_on_random_p_values():
    """Second implementation: adjusted p_(i) = max_{j<=i} min(1, (m - j + 1) p_(j))."""
    p = np.random.default_rng(1).uniform(0, 0.2, size=9)
    order = np.argsort(p)
    m = len(p)
    expected = np.empty(m)
    for i in range(m):
        expected[order[i]] = max(min(1.0, (m - j) * p[order[j]]) for j in range(i + 1))
    np.testing.assert_allclose(holm(p), expected, atol=1e-12)


def test_wilcoxon_p_value_and_effect_sizes_by_hand():
    first = np.array([0.6, 0.7, 0.2, 0.9, 0.5])
    second = np.array([0.5, 0.5, 0.5, 0.5, 0.5])
    # differences 0.1, 0.2, -0.3, 0.4, 0: the zero is dropped, |d| ranks 1, 2, 3, 4
    test = paired_wilcoxon(first, second)
    assert (test.n, test.n_nonzero) == (5, 4)
    assert test.statistic == 3.0                      # min(R+ = 1 + 2 + 4, R- = 3)
    assert test.rank_biserial == pytest.approx((7 - 3) / 10)
    assert test.median_difference == pytest.approx(0.1)
    assert test.mean_difference == pytest.approx(0.08)
    assert test.p == stats.wilcoxon(first, second).pvalue
    assert test.p == pytest.approx(10 / 16)             # exact null: 10 of 16 sign patterns have min(R+, R-) <= 3


def test_wilcoxon_matches_scipy_on_random_pairs_and_drops_undefined_pairs():
    rng = np.random.default_rng(5)
    a, b = rng.uniform(0.4, 0.9, 40), rng.uniform(0.4, 0.9, 40)
    assert paired_wilcoxon(a, b).p == stats.wilcoxon(a, b).pvalue
    a_missing = a.copy()
    a_missing[[3, 17]] = np.nan
    keep = np.isfinite(a_missing)
    test = paired_wilcoxon(a_missing, b)
    assert test.n == 38
    assert test.p == stats.wilcoxon(a[keep], b[keep]).pvalue


def test_rank_biserial_with_ties_equals_the_simple_difference_formula():
    """Kerby's formula r = (R+ - R-) / S with S = n(n+1)/2 (average ranks keep the sum)."""
    d = np.array([0.1, -0.1, 0.2, 0.2, -0.05, 0.3, 0.0])
    nonzero = d[d != 0]
    ranks = stats.rankdata(np.abs(nonzero))
    n = nonzero.size
    expected = (ranks[nonzero > 0].sum() - ranks[nonzero < 0].sum()) / (n * (n + 1) / 2)
    assert rank_biserial(d) == pytest.approx(expected)
    assert rank_biserial([0.2, 0.1]) == 1.0 and rank_biserial([-0.2, -0.1]) == -1.0


def test_no_difference_is_not_tested():
    test = paired_wilcoxon([0.5, 0.6], [0.5, 0.6])
    assert test.n == 2 and test.n_nonzero == 0 and math.isnan(test.p)


def test_format_p():
    assert format_p(0.0031) == "0.003"
    assert format_p(0.00002) == "2.0e-05"
    assert format_p(float("nan")) == "n/a"


def test_floating_point_noise_counts_as_no_difference():
    a = np.array([0.1, 0.2, 0.3]) + np.array([0.2, 0.3, 0.4])   # the same sums, added in another order,
    b = np.array([0.2, 0.3, 0.4]) + np.array([0.1, 0.2, 0.3])   # may differ in the last bit
    c = (np.array([0.7, 0.1, 0.2]) + np.array([0.1, 0.2, 0.3])) / 2
    d = (np.array([0.1, 0.2, 0.3]) + np.array([0.7, 0.1, 0.2])) / 2
    for first, second in ((a, b), (c, d)):
        test = paired_wilcoxon(first, second)
        assert test.n_nonzero == 0 and math.isnan(test.p)


def test_seed_sd_and_its_pooled_value_by_hand():
    # subjects x seeds; seed means 0.6, 0.7 -> SD sqrt(0.005)
    first = np.array([[0.5, 0.6], [0.7, 0.8]])
    assert seed_sd(first) == pytest.approx(np.sqrt(0.005))
    # seed means 0.5, 0.6, 0.85 -> variance 0.0325
    second = np.array([[0.4, 0.5, 0.8], [0.6, 0.7, 0.9]])
    assert seed_sd(second) == pytest.approx(np.sqrt(0.0325))
    sd, df = pooled_seed_sd([first, second, np.array([[0.3], [0.4]])])  # one seed: no information, left out
    assert df == 1 + 2
    assert sd == pytest.approx(np.sqrt((1 * 0.005 + 2 * 0.0325) / 3))
    assert math.isnan(seed_sd(np.array([[0.5], [0.6]])))
    no_sd, no_df = pooled_seed_sd([np.ones((3, 1))])
    assert math.isnan(no_sd) and no_df == 0
    # a subject missing in one seed is left out of every seed's mean
    holed = np.array([[0.5, 0.6], [0.7, np.nan], [0.9, 1.0]])
    assert seed_sd(holed) == pytest.approx(np.std([0.7, 0.8], ddof=1))


def test_noise_sd_of_a_difference_and_the_within_noise_rule():
    # one configuration of 2 seeds a side: sqrt(2 / 2) x sd
    assert difference_noise_sd(0.03, [2], [2]) == pytest.approx(0.03)
    # 3 seeds a side: sqrt(2 / 3) x sd
    assert difference_noise_sd(0.03, [3], [3]) == pytest.approx(0.03 * np.sqrt(2 / 3))
    # two configurations of 2 seeds vs one of 4: v_a = (1/2) / 2, v_b = 1/4
    assert difference_noise_sd(0.03, [2, 2], [4]) == pytest.approx(0.03 * np.sqrt(0.25 + 0.25))
    assert math.isnan(difference_noise_sd(float("nan"), [1], [1]))
    assert within_noise(0.05, 0.03) is True and within_noise(0.07, 0.03) is False
    assert within_noise(-0.07, 0.03) is False and within_noise(0.01, float("nan")) is None


def test_factor_verdicts_pick_the_winner_and_apply_the_holds_up_rule():
    """The winner is the highest marginal mean, its test the pooled row of winner vs runner-up (the
    held-at-best row where there is no pooled one); holds up = significant after Holm and beyond noise."""
    def marginal(means):
        return pd.DataFrame({"level": list(means), "mean": list(means.values()), "low": 0.0, "high": 1.0, "cells": 2})

    def test(factor, comparison, a, b, p_holm, within, difference):
        return {"factor": factor, "comparison": comparison, "level_a": a, "level_b": b, "n": 10, "unit": "subject",
                "p": p_holm / 3, "p_holm": p_holm, "median_difference": difference, "mean_difference": difference,
                "noise_sd": 0.01, "within_noise": within}

    marginals = {"backbone": marginal({"a": 0.70, "b": 0.80, "c": 0.75}), "loss": marginal({"x": 0.6, "y": 0.5}),
                 "prompt": marginal({"box": 0.9, "point": 0.4}), "optimizer": marginal({"adam": 0.7, "sgd": 0.69}),
                 "lr": marginal({"0.001": 0.7, "0.0001": 0.6})}
    tests = pd.DataFrame([
        test("backbone", "held at best", "b", "c", 0.9, False, 0.05),   # not the row used: a pooled one exists
        test("backbone", "pooled", "b", "c", 0.01, False, 0.05),
        test("backbone", "pooled", "a", "b", 0.01, False, -0.1),
        test("loss", "pooled", "y", "x", 0.01, True, -0.1),             # the runner-up first: the sign flips
        test("prompt", "pooled", "box", "point", 0.001, None, 0.5),     # one seed: noise not measured
        test("optimizer", "pooled", "adam", "sgd", 0.2, None, 0.01),
        test("lr", "held at best", 0.001, 0.0001, 0.01, False, 0.1),    # no pooled row: held at best; numeric levels
    ])
    verdicts = factor_verdicts(tests, marginals).set_index("factor")
    assert verdicts.loc["backbone", ["winner", "runner_up", "comparison"]].tolist() == ["b", "c", "pooled"]
    assert verdicts.loc["backbone", "holds_up"] is True and verdicts.loc["backbone", "p_holm"] == 0.01
    assert verdicts.loc["loss", "winner"] == "x" and verdicts.loc["loss", "mean_difference"] == pytest.approx(0.1)
    assert verdicts.loc["loss", "holds_up"] is False                     # significant but within training noise
    assert verdicts.loc["prompt", "holds_up"] is None and verdicts.loc["prompt", "significant"]
    assert verdicts.loc["optimizer", "holds_up"] is False and not verdicts.loc["optimizer", "significant"]
    assert verdicts.loc["lr", ["winner", "comparison"]].tolist() == ["0.001", "held at best"]
    assert verdicts.loc["lr", "holds_up"] is True
