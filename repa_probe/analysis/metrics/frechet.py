"""Fréchet distance between Gaussians fitted to features, in float64.

``d² = ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^{1/2}``. The default ``"eigvals"`` form is torch-fidelity
0.4's (``tr sqrt = Σ Re sqrt(eigvals(Σ1 Σ2))``); ``"sqrtm"`` is ADM's evaluator (scipy ``sqrtm``, retried with
1e-6 added to the diagonals when not finite, imaginary parts above 1e-3 rejected). Statistics are ADM's:
``μ`` the mean, ``Σ = np.cov(rowvar=False)`` (unbiased), both float64.
"""
from __future__ import annotations

import logging

import numpy as np

from repa_probe.analysis.errors import MetricInputError
from repa_probe.reports.bootstrap import resample_indices

log = logging.getLogger("repa_probe")


def statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """``features: (N, D)`` (torch or numpy) -> ``(mu (D,), sigma (D, D))`` float64, unbiased covariance.

    Warns when N <= D: the covariance is rank-deficient and the distance biased (FID-50K is the protocol).
    """
    f = np.asarray(features.detach().cpu().numpy() if hasattr(features, "detach") else features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise MetricInputError(f"need features of shape (N >= 2, D), got {f.shape}")
    n, d = f.shape
    if n <= d:
        log.warning("only %d samples for %d-dimensional features: the covariance is rank-deficient and the "
                    "Fréchet distance is biased upward (the protocol uses 50000 samples)", n, d)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def fd_replicates(features, mu_ref, sigma_ref, replicates: int, seed: int = 0) -> np.ndarray:
    """``(replicates,)`` Fréchet distances of ``features: (N, D)`` resampled with replacement (indices of
    :func:`repa_probe.reports.bootstrap.resample_indices`) against fixed reference statistics: the sampling
    uncertainty of an FD over the generated samples (the reference is held fixed)."""
    f = np.asarray(features.detach().cpu().numpy() if hasattr(features, "detach") else features, dtype=np.float64)
    return np.array([frechet_distance(f[i].mean(axis=0), np.cov(f[i], rowvar=False), mu_ref, sigma_ref)
                     for i in resample_indices(len(f), replicates, seed)])


def _check(mu1, sigma1, mu2, sigma2):
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != mu2.shape or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise MetricInputError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                           f"{sigma2.shape} (features of different extractors or layers?)")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise MetricInputError("statistics contain NaN or infinite values")
    return mu1, sigma1, mu2, sigma2


def frechet_distance(mu1, sigma1, mu2, sigma2, method: str = "eigvals") -> float:
    """Fréchet distance of N(mu1, sigma1) and N(mu2, sigma2); ``method`` "eigvals" or "sqrtm" (see module)."""
    mu1, sigma1, mu2, sigma2 = _check(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    if method == "eigvals":
        tr_covmean = np.sum(np.sqrt(np.linalg.eigvals(sigma1 @ sigma2).astype(np.complex128)).real)
    elif method == "sqrtm":
        tr_covmean = _trace_sqrtm(sigma1, sigma2)
    else:
        raise MetricInputError(f"method must be 'eigvals' or 'sqrtm', got {method!r}")
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def _trace_sqrtm(sigma1, sigma2) -> float:
    from scipy import linalg

    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise MetricInputError(f"sqrtm has imaginary component {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(np.trace(covmean))
