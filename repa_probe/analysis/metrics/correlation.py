"""Correlation of two quantities over n points (checkpoints): Pearson and Spearman r with a percentile bootstrap
interval and a two-sided permutation p-value. Pure numpy; the analysis that joins result tables into the two
columns is :mod:`repa_probe.analysis.correlation.correlate`."""
from __future__ import annotations

import math

import numpy as np
from scipy.stats import rankdata

from repa_probe.analysis.errors import MetricInputError

MIN_POINTS = 3  # fewer points give no interval worth reporting


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of every row pair of ``x, y: (R, n)`` (NaN for a constant row)."""
    xc, yc = x - x.mean(1, keepdims=True), y - y.mean(1, keepdims=True)
    den = np.sqrt((xc * xc).sum(1) * (yc * yc).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (xc * yc).sum(1) / den, np.nan)


def _spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return _pearson_rows(rankdata(x, axis=1), rankdata(y, axis=1))


def correlation(x, y, bootstrap: int = 2000, permutations: int = 10000, seed: int = 0, ci: float = 0.95) -> dict:
    """Pearson and Spearman of ``x, y: (n,)``: ``{"pearson": {r, ci_low, ci_high, p_perm}, "spearman": ...}``.

    Intervals: percentile bootstrap over the n points (``bootstrap`` resamples; resamples with a constant
    side are skipped). p-values: two-sided, ``(1 + #{|r_perm| >= |r|}) / (1 + permutations)``.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = len(x)
    if n < MIN_POINTS or y.shape != x.shape or x.ndim != 1:
        raise MetricInputError(f"a correlation needs two (n,) arrays with n >= {MIN_POINTS}, got {x.shape} and {y.shape}")
    rng = np.random.default_rng(seed)
    boot = rng.integers(0, n, size=(bootstrap, n)) if bootstrap else None
    perm = rng.permuted(np.tile(np.arange(n), (permutations, 1)), axis=1) if permutations else None
    out = {}
    for name, fn in (("pearson", _pearson_rows), ("spearman", _spearman_rows)):
        r = float(fn(x[None], y[None])[0])
        res = {"r": r, "ci_low": None, "ci_high": None, "p_perm": None}
        if boot is not None:
            reps = fn(x[boot], y[boot])
            reps = reps[np.isfinite(reps)]
            if len(reps):
                a = (1 - ci) / 2
                res["ci_low"], res["ci_high"] = (float(v) for v in np.quantile(reps, [a, 1 - a]))
        if perm is not None and math.isfinite(r):
            null = fn(np.broadcast_to(x, (permutations, n)), y[perm])
            res["p_perm"] = float((1 + np.sum(np.abs(null) >= abs(r) - 1e-12)) / (1 + permutations))
        out[name] = res
    return out
