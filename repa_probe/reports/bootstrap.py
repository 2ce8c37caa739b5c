"""Bootstrap replicates: drawn at analysis time, stored beside the CSVs, combined into intervals of values and
of differences at report time (the one owner of the interval formula).

Why replicates and not per-image values: CKNNA is a statistic of the whole image set (a kernel alignment),
not a mean of per-image values, so its uncertainty must be resampled when the features exist. Every analysis
therefore stores, per CSV row, ``B`` replicate statistics computed on resampled image (or sample) sets whose
indices depend only on ``(N, B, seed)``: replicate ``j`` of two checkpoints analysed on the same images uses
the same images, and the replicate-wise difference is a paired bootstrap of the difference.

Two resampling schemes: ``scale = 1`` for the classic bootstrap of a mean (with replacement: spatial metrics,
probe accuracy, Fréchet distances) and half-sampling without replacement for the kNN-kernel metrics
(:func:`repa_probe.analysis.metrics.bootstrap`; duplicates would be their twins' nearest neighbours), whose
replicate spread is rescaled by ``sqrt(f / (1 - f))`` (1 for f = 1/2). Intervals are re-centred on the full
data: ``value + scale * (q_{2.5%, 97.5%}(reps) - mean(reps))`` (for a mean the percentile interval).

Files: ``replicates.npz`` with ``keys (K,)`` (:func:`row_key` of each row), ``values (K, B)`` float32 and
``scale (K,)``; a sweep merges its units' files into ``results/<analysis>/replicates.npz``.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

CI = 0.95
ID_COLUMNS = ("checkpoint", "source", "layer", "timestep", "metric")
FILE = "replicates.npz"


def _norm(v) -> str:
    if v is None:
        return ""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return f"{float(v):g}"
    return str(v)


def row_key(row: dict) -> str:
    """Identity of a CSV row (its checkpoint, source, layer, timestep, metric; whichever it has), the same
    for the in-memory row and the row read back from its CSV."""
    return "|".join(f"{c}={_norm(row.get(c))}" for c in ID_COLUMNS if c in row)


def resample_means(values, replicates: int, seed: int = 0) -> np.ndarray:
    """``(replicates,)`` means of ``values: (N,)`` over images drawn with replacement (NaN values left out of
    each mean); the indices depend only on ``(N, replicates, seed)``."""
    v = np.asarray(values, dtype=np.float64)
    idx = resample_indices(len(v), replicates, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a replicate of only NaN values is NaN
        return np.nanmean(v[idx], axis=1)


def resample_indices(n: int, replicates: int, seed: int = 0) -> np.ndarray:
    """``(replicates, n)`` indices drawn with replacement (numpy ``default_rng(seed)``)."""
    return np.random.default_rng(seed).integers(0, n, size=(replicates, n))


def interval(value: float, reps, scale: float = 1.0, ci: float = CI) -> tuple[float | None, float | None]:
    """``(low, high)``: the ``ci`` interval of ``value`` from its replicates (None when there are fewer than 2
    finite replicates)."""
    r = np.asarray(reps, dtype=np.float64)
    r = r[np.isfinite(r)]
    if r.size < 2 or value is None or not math.isfinite(value):
        return None, None
    alpha = (1.0 - ci) / 2.0
    lo, hi = np.quantile(r, [alpha, 1.0 - alpha])
    centre = r.mean()
    return float(value + scale * (lo - centre)), float(value + scale * (hi - centre))


def difference(a: float, b: float, reps_a, reps_b, scale: float = 1.0, ci: float = CI):
    """``(a - b, low, high)``: the paired bootstrap interval of a difference (replicate-wise differences)."""
    d = a - b
    if reps_a is None or reps_b is None or len(reps_a) != len(reps_b):
        return d, None, None
    lo, hi = interval(d, np.asarray(reps_a, np.float64) - np.asarray(reps_b, np.float64), scale, ci)
    return d, lo, hi


# ----------------------------------------------------------------------------------------------- files
def take_replicates(rows: Iterable[dict]) -> dict:
    """Pop ``replicates`` / ``replicate_scale`` from every row that has them: ``{row_key: (reps, scale)}``
    (rows keep their CSV columns only)."""
    out = {}
    for r in rows:
        reps = r.pop("replicates", None)
        scale = r.pop("replicate_scale", 1.0)
        if reps is not None:
            out[row_key(r)] = (np.asarray(reps, dtype=np.float32), float(scale))
    return out


def write_replicates(store: dict, path: Path) -> Path | None:
    """``{key: (reps (B,), scale)}`` -> ``path`` (npz, atomically); an empty store writes nothing and removes
    an earlier file (so a rerun without bootstrap leaves no stale replicates)."""
    path = Path(path)
    if not store:
        path.unlink(missing_ok=True)
        return None
    keys = list(store)
    width = max(len(store[k][0]) for k in keys)
    values = np.full((len(keys), width), np.nan, dtype=np.float32)
    for i, k in enumerate(keys):
        values[i, : len(store[k][0])] = store[k][0]
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez_compressed(tmp, keys=np.array(keys), values=values, scale=np.array([store[k][1] for k in keys]))
    tmp.replace(path)
    return path


def read_replicates(paths: Sequence[Path]) -> dict:
    """``{key: (reps, scale)}`` from one or more files (later files win on a repeated key)."""
    out = {}
    for p in paths:
        if not Path(p).is_file():
            continue
        with np.load(p, allow_pickle=False) as z:
            for k, v, s in zip(z["keys"].tolist(), z["values"], z["scale"]):
                out[k] = (v[np.isfinite(v)], float(s))
    return out
