"""Rank correlations and the notes that say when one is undefined or means little (small n, constants)."""

from __future__ import annotations

import math

import numpy as np


def rank_correlation(x: np.ndarray, y: np.ndarray) -> dict:
    from scipy import stats  # deferred: scipy.stats costs a second at import

    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    out = {"n": int(len(x)), "spearman_r": math.nan, "spearman_p": math.nan, "kendall_tau": math.nan,
           "kendall_p": math.nan, "note": correlation_note(len(x), x, y)}
    # A rank correlation of fewer than 3 points, or with a constant, is undefined; scipy would warn.
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return out
    s, k = stats.spearmanr(x, y), stats.kendalltau(x, y)
    return out | {"spearman_r": float(s.statistic), "spearman_p": float(s.pvalue),
                  "kendall_tau": float(k.statistic), "kendall_p": float(k.pvalue)}


SMALL_N = 5  # fewer ranked models than this: a p-value says next to nothing


def correlation_note(n: int, x=None, y=None) -> str:
    """Why a rank correlation of `n` points is undefined (NaN) or its p-value means little; "" if neither.

    `x`, `y` (optional): the values, to say when one of them is constant.
    """
    if n < 3:
        return f"n = {n}: fewer than 3 values, no rank correlation"
    if x is not None and y is not None and (np.ptp(np.asarray(x, float)) == 0 or np.ptp(np.asarray(y, float)) == 0):
        return "constant values: no ranking, no correlation"
    if n < SMALL_N:
        # Both tests' exact two-sided p-values are at least 2/n! (only the two orders that match exactly);
        # scipy's Spearman p is a large-sample approximation and can print 0 here.
        return f"n = {n} < {SMALL_N}: too few for a test (no exact p-value can be below {2 / math.factorial(n):.2g})"
    return ""
