"""stats.py against scipy: the intervals and paired tests every table of seeds is built from."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from mtbert_utils.stats import mean_ci, paired_comparison

# float64 sums over at most a few dozen values, then a handful of products: well under 1e-12 relative
REL = 1e-12


@pytest.mark.parametrize("values", [[0.5, 0.7], [0.41, 0.47, 0.52], [1.0, 2.0, 4.0, 8.0, 16.0],
                                    list(np.linspace(-1, 2, 30) ** 2)])
@pytest.mark.parametrize("confidence", [0.95, 0.9, 0.99])
def test_mean_ci_is_students_t_interval(values, confidence):
    """Invariant: the half-width is that of scipy's t interval with n - 1 degrees of freedom.

    Kills: a normal (z) quantile, a one-sided quantile, the wrong degrees of freedom, ddof=0, sd not sem.
    """
    mean, half = mean_ci(values, confidence)
    x = np.asarray(values)
    lo, hi = sps.t.interval(confidence, len(x) - 1, loc=x.mean(), scale=sps.sem(x))
    assert mean == pytest.approx(x.mean(), rel=REL)
    assert half == pytest.approx((hi - lo) / 2, rel=REL)
    assert mean - half == pytest.approx(lo, rel=REL, abs=1e-15)


def test_three_seed_interval_by_hand():
    # the study's 3 seeds: t_{0.975, 2} = 4.3027 (tables), not z = 1.96
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert half == pytest.approx(4.302652729911275 * 1.0 / math.sqrt(3), rel=1e-9)


def test_mean_ci_degenerate_sizes():
    m, h = mean_ci([])
    assert math.isnan(m) and math.isnan(h)
    m, h = mean_ci([0.25])
    assert m == 0.25 and math.isnan(h)  # one seed: no interval, not a zero-width one
    assert mean_ci([0.3, 0.3, 0.3]) == (pytest.approx(0.3, rel=REL), 0.0)


@pytest.mark.parametrize("a,b", [([0.50, 0.52, 0.49], [0.47, 0.50, 0.48]),
                                 ([0.1, 0.4, 0.2, 0.8], [0.3, 0.1, 0.25, 0.5]),
                                 ([1.0, 2.0], [3.0, 1.0])])
def test_paired_comparison_matches_scipy(a, b):
    """Invariant: p of scipy's paired t-test, the t interval of the differences, d_z = mean / sd(ddof=1)."""
    out = paired_comparison(a, b)
    d = np.asarray(a) - np.asarray(b)
    ref = sps.ttest_rel(a, b)
    ci = ref.confidence_interval(0.95)
    assert out["n"] == len(a)
    assert out["mean_diff"] == pytest.approx(d.mean(), rel=REL)
    assert out["ci95"] == pytest.approx((ci.high - ci.low) / 2, rel=1e-9)
    assert out["p_value"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert out["cohens_dz"] == pytest.approx(d.mean() / d.std(ddof=1), rel=REL)
    # the comparison is antisymmetric: swapping the arms flips the sign, keeps p
    back = paired_comparison(b, a)
    assert back["mean_diff"] == pytest.approx(-out["mean_diff"], rel=REL)
    assert back["cohens_dz"] == pytest.approx(-out["cohens_dz"], rel=REL)
    assert back["p_value"] == pytest.approx(out["p_value"], rel=1e-9)


def test_paired_comparison_without_spread():
    same = paired_comparison([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    assert (same["mean_diff"], same["ci95"], same["p_value"], same["cohens_dz"]) == (0.0, 0.0, 1.0, 0.0)
    # every seed exactly 0.5 better (binary fractions, so the differences are exact): certain
    shifted = paired_comparison([1.5, 2.5, 3.0], [1.0, 2.0, 2.5])
    assert (shifted["mean_diff"], shifted["ci95"], shifted["p_value"], shifted["cohens_dz"]) == (0.5, 0.0, 0.0, math.inf)
    assert paired_comparison([1.0, 2.0], [1.5, 2.5])["cohens_dz"] == -math.inf


@pytest.mark.parametrize("a,b", [([0.5], [0.4]), ([0.5, 0.6], [0.4]), ([], [])])
def test_paired_comparison_rejects_unpaired_or_single_seeds(a, b):
    with pytest.raises(ValueError, match="paired comparison needs"):
        paired_comparison(a, b)


def test_verdict_from_the_paired_interval():
    """'holds' only if the whole 95% interval of a - b lies above 0, 'reversed' only if wholly below;
    an interval that touches 0, or none (nan: one seed), is 'not resolved'."""
    from mtbert_utils.stats import verdict
    assert verdict(0.05, 0.02) == "holds"
    assert verdict(-0.05, 0.02) == "reversed"
    assert verdict(0.01, 0.02) == verdict(-0.01, 0.02) == "not resolved"
    assert verdict(0.25, 0.25) == verdict(-0.25, 0.25) == "not resolved"  # the interval ends at 0 exactly
    assert verdict(0.0, 0.0) == "not resolved"
    assert verdict(2.0, 0.5) == "holds" and verdict(-2.0, 0.5) == "reversed"  # far from 0 too
    assert verdict(0.3, float("nan")) == "not resolved"  # one seed: no interval
