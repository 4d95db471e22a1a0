"""Statistics over seeds: mean with a t-based 95% confidence interval, paired comparisons."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def mean_ci(values, confidence: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the t confidence interval (nan half-width for one value)."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return float("nan"), float("nan")
    if len(x) == 1:
        return float(x[0]), float("nan")
    sem = x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(stats.t.ppf((1 + confidence) / 2, len(x) - 1) * sem)


def paired_comparison(a, b) -> dict:
    """Paired t-test of a - b over the same seeds, with Cohen's d_z (mean difference / sd of differences).

    With 3 seeds a test has little power: read p together with the effect size and the interval. Differences
    equal in every seed (no spread: a metric that did not move, such as an accuracy stuck at one count) give
    the t-test's limit: a CI of 0, p = 0 and an infinite d_z (p = 1 and d_z = 0 if they are all zero), so a
    verdict then rests on the seeds agreeing exactly, not on a measured spread.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or len(a) < 2:
        raise ValueError(f"paired comparison needs two equal-length samples of >= 2 seeds, got {len(a)} and {len(b)}")
    d = a - b
    mean, half = mean_ci(d)
    sd = d.std(ddof=1)
    if sd == 0:
        p = 1.0 if mean == 0 else 0.0
        dz = 0.0 if mean == 0 else math.copysign(math.inf, mean)
    else:
        p = float(stats.ttest_rel(a, b).pvalue)
        dz = float(mean / sd)
    return {"n": int(len(d)), "mean_diff": mean, "ci95": half, "p_value": p, "cohens_dz": dz}


def verdict(mean_diff: float, ci95: float) -> str:
    """'holds' if the 95% CI of a - b lies above 0, 'reversed' if below, else 'not resolved'."""
    if ci95 != ci95:  # nan: a single seed has no interval
        return "not resolved"
    if mean_diff - ci95 > 0:
        return "holds"
    if mean_diff + ci95 < 0:
        return "reversed"
    return "not resolved"
