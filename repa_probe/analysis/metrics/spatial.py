"""Spatial-structure metrics of patch tokens (iREPA, Singh et al. 2025, arXiv 2512.10794).

Every metric takes patch tokens ``tokens: (B, T, D)`` (no CLS / register tokens) laid out row-major on a
grid (``grid=(H, W)``, default the square ``sqrt(T) x sqrt(T)``) and returns one float32 value per image,
``(B,)``. Tokens are L2-normalised in float32 (a zero token has cosine 0 with everything); ``K(t, t')`` is
the cosine of two tokens and ``d(t, t')`` their Manhattan distance in patch units. Higher = more spatial
structure for all four:

* :func:`lds` local-vs-distant similarity: mean K over pairs with ``1 <= d <= near`` minus mean K over
  pairs with ``d >= far`` (every pair weighted equally). ``variant="code"`` (default): near 1 (the
  4-neighbours), far 6, as iREPA's code and its published correlations; ``variant="paper"``: the paper's
  ``r_near = r_far = H/2`` (near ``1..H/2-1``, far ``>= H/2``).
* :func:`cds` correlation-decay slope: minus the OLS slope of ``g(d) = mean K at distance d`` over
  ``d = 1..dmax`` (default 8; distances the grid does not have are skipped, as in iREPA).
* :func:`srss` semantic-region self-similarity: for every foreground anchor, mean K to foreground tokens at
  ``d_pos_min <= d <= d_pos`` minus mean K to background tokens at ``d >= d_neg``, averaged over anchors
  that have both; NaN for an image with < 2 foreground tokens, no background token or no valid anchor.
  ``variant="paper"``: ``d_pos = d_neg = H/2``.
* :func:`rmsc` RMS spatial contrast: ``sqrt(mean_t |x̂_t - mean_t' x̂_t'|^2)`` (no positions used).

These agree with iREPA's ``metrics/spatial_metrics.py`` (commit 99ad4ac) to 1e-5, except that a grid too
small for the far term (no pair at ``d >= far`` / ``d_neg``), or with fewer than two fitted distances for
CDS, is refused with a :class:`MetricInputError` where iREPA silently returns the local term / 0 / NaN.

Memory: images are processed in chunks of ``chunk_size`` (default: a ~256 MiB working set, ~100 images of
256 × 1152 tokens), so at most a ``(chunk, T, T)`` Gram matrix exists at any time, never ``(B, T, T)``.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from repa_probe.analysis.errors import MetricInputError

__all__ = ["SPATIAL_METRICS", "MetricInputError", "lds", "cds", "srss", "rmsc", "spatial_metrics",
           "grid_shape", "pair_counts"]

SPATIAL_METRICS = ("lds", "cds", "srss", "rmsc")
VARIANTS = ("code", "paper")
_EPS = 1e-8            # iREPA's normalisation epsilon for LDS, CDS, RMSC
_EPS_SRSS = 1e-12      # iREPA's SRSS uses F.normalize's default
_CHUNK_BYTES = 1 << 28   # working set per chunk of images: tokens + Gram + its float64 copy + masked copies


# ---------------------------------------------------------------------------------------------- grid
def grid_shape(num_tokens: int, grid: Sequence[int] | None = None) -> tuple[int, int]:
    """``(H, W)`` of a token grid: ``grid`` checked against ``num_tokens``, or the square root of it."""
    if grid is None:
        h = math.isqrt(num_tokens)
        if h * h != num_tokens:
            raise MetricInputError(f"T = {num_tokens} tokens is not a square grid: pass grid=(H, W)")
        return h, h
    h, w = (int(v) for v in grid)
    if h < 1 or w < 1 or h * w != num_tokens:
        raise MetricInputError(f"grid {h}x{w} does not hold T = {num_tokens} tokens")
    return h, w


_DIST: dict = {}


def _distances(h: int, w: int, device) -> torch.Tensor:
    """Manhattan distances of the row-major ``h x w`` grid, ``(T, T)`` int64 (cached)."""
    key = (h, w, str(device))
    if key not in _DIST:
        y, x = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        y, x = y.reshape(-1), x.reshape(-1)
        _DIST[key] = (y[:, None] - y[None, :]).abs() + (x[:, None] - x[None, :]).abs()
    return _DIST[key]


def pair_counts(h: int, w: int) -> torch.Tensor:
    """``n(d)`` for d = 0..H+W-2: ordered token pairs at each Manhattan distance, ``(H+W-1,)`` float64."""
    return torch.bincount(_distances(h, w, "cpu").reshape(-1), minlength=h + w - 1).double()


# ------------------------------------------------------------------------------------------ helpers
def _check_tokens(tokens, grid) -> tuple[torch.Tensor, int, int]:
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 3 or not tokens.is_floating_point():
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise MetricInputError(f"tokens must be a floating (B, T, D) tensor, got {shape}")
    h, w = grid_shape(tokens.shape[1], grid)
    return tokens, h, w


def _check_int(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise MetricInputError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _need_far(what: str, far: int, h: int, w: int) -> None:
    if h + w - 2 < far:
        raise MetricInputError(f"{what}: a {h}x{w} grid has no token pairs at distance >= {far} (largest is "
                                 f"{h + w - 2}); use a larger grid or a smaller {what.split()[-1]}")


def _chunks(tokens: torch.Tensor, chunk_size: int | None) -> Iterable[slice]:
    """Slices of images whose working set (normalised tokens, Gram and its copies) fits :data:`_CHUNK_BYTES`."""
    n, t, d = tokens.shape
    size = chunk_size or max(1, _CHUNK_BYTES // (4 * t * d + 24 * t * t))
    return (slice(i, min(i + size, n)) for i in range(0, n, size))


def _gram(tokens: torch.Tensor, eps: float) -> torch.Tensor:
    """Cosine Gram of each image: ``tokens (b, T, D) -> (b, T, T)`` float32."""
    u = F.normalize(tokens.to(torch.float32), dim=-1, eps=eps)
    return torch.bmm(u, u.transpose(1, 2))


def _pairwise(tokens: torch.Tensor, h: int, w: int, sums: bool, fg, pos, neg, chunk_size: int | None):
    """One Gram per chunk of images, reduced to what the metrics need.

    Returns ``(S, srss)``: ``S`` the sum of K over the ordered pairs at each distance d = 0..H+W-2,
    ``(B, H+W-1)`` float64 (None unless ``sums``), and the SRSS values ``(B,)`` (None unless ``fg``: ``(B, T)``
    bool foreground, ``pos``/``neg``: ``(T, T)`` float distance masks).
    """
    onehot = F.one_hot(_distances(h, w, tokens.device).reshape(-1), h + w - 1).double() if sums else None
    out_s, out_r = [], []
    for s in _chunks(tokens, chunk_size):
        x = tokens[s]
        g = _gram(x, _EPS)                                                 # (b, T, T)
        if onehot is not None:
            out_s.append(g.flatten(1).double() @ onehot)
        if fg is not None:
            if x.shape[0] and float(x.float().norm(dim=-1).min()) < _EPS:  # only then do the epsilons differ
                g = _gram(x, _EPS_SRSS)
            out_r.append(_srss_chunk(g, fg[s], pos, neg))
    cat = lambda parts, shape, dtype: torch.cat(parts) if parts else torch.zeros(shape, dtype=dtype,
                                                                                 device=tokens.device)
    return (cat(out_s, (0, h + w - 1), torch.float64) if sums else None,
            cat(out_r, (0,), torch.float32) if fg is not None else None)


def _band_mean(sums: torch.Tensor, counts: torch.Tensor, low: int, high: int | None = None) -> torch.Tensor:
    """Pair-weighted mean K over distances ``low..high`` (inclusive; None = to the end): ``(B,)`` float64."""
    sl = slice(low, None if high is None else high + 1)
    return sums[:, sl].sum(1) / counts[sl].sum()


def _half(h: int, w: int) -> int:
    return max(1, min(h, w) // 2)


# ------------------------------------------------------------------------------------------ metrics
def lds(tokens: torch.Tensor, grid: Sequence[int] | None = None, *, near: int | None = None, far: int | None = None,
        variant: str = "code", chunk_size: int | None = None) -> torch.Tensor:
    """Local-vs-distant similarity ``(B,)`` of ``tokens: (B, T, D)``: mean K at ``1 <= d <= near`` minus mean
    K at ``d >= far``. Defaults: ``variant="code"`` near 1, far 6 (iREPA's code); ``"paper"`` near H/2-1,
    far H/2 (iREPA's paper, r = H/2)."""
    return spatial_metrics(tokens, ["lds"], grid, near=near, far=far, variant=variant, chunk_size=chunk_size)["lds"]


def cds(tokens: torch.Tensor, grid: Sequence[int] | None = None, *, dmax: int = 8,
        chunk_size: int | None = None) -> torch.Tensor:
    """Correlation-decay slope ``(B,)`` of ``tokens: (B, T, D)``: ``-slope`` of the least-squares line through
    ``(d, mean K at d)`` for the distances ``1..dmax`` the grid has (iREPA: dmax = 8)."""
    return spatial_metrics(tokens, ["cds"], grid, dmax=dmax, chunk_size=chunk_size)["cds"]


def rmsc(tokens: torch.Tensor, grid: Sequence[int] | None = None, *, sqrt: bool = True,
         chunk_size: int | None = None) -> torch.Tensor:
    """RMS spatial contrast ``(B,)`` of ``tokens: (B, T, D)``: RMS distance of the unit tokens to their mean
    (``sqrt=False``: its square). ``grid`` is only validated (the metric uses no positions)."""
    tokens, _, _ = _check_tokens(tokens, grid)
    out = []
    for s in _chunks(tokens, chunk_size):
        x = F.normalize(tokens[s].to(torch.float32), dim=-1, eps=_EPS)
        out.append((x - x.mean(dim=1, keepdim=True)).square().sum(-1).mean(1))
    ms = torch.cat(out) if out else tokens.new_zeros(0, dtype=torch.float32)
    return ms.sqrt() if sqrt else ms


def srss(tokens: torch.Tensor, grid: Sequence[int] | None = None, *, masks: torch.Tensor, d_pos: int | None = None,
         d_neg: int | None = None, d_pos_min: int = 1, variant: str = "code",
         chunk_size: int | None = None) -> torch.Tensor:
    """Semantic-region self-similarity ``(B,)`` of ``tokens: (B, T, D)`` with foreground ``masks: (B, T)``
    (bool, or nonzero = foreground). Defaults: ``variant="code"`` d_pos 1, d_neg 6; ``"paper"`` both H/2.
    NaN for images with < 2 foreground tokens, no background token or no valid anchor (as iREPA)."""
    return spatial_metrics(tokens, ["srss"], grid, masks=masks, d_pos=d_pos, d_neg=d_neg, d_pos_min=d_pos_min,
                           variant=variant, chunk_size=chunk_size)["srss"]


def _srss_chunk(g: torch.Tensor, fg: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """SRSS of one chunk: cosine Gram ``g (b, T, T)``, ``fg (b, T)`` bool, ``pos``/``neg`` ``(T, T)`` masks."""
    fgf, bgf = fg.to(g.dtype), (~fg).to(g.dtype)
    pos_sums = torch.bmm(g * pos, fgf[:, :, None])[..., 0]              # (b, T): sum over FG neighbours
    neg_sums = torch.bmm(g * neg, bgf[:, :, None])[..., 0]
    pos_n, neg_n = fgf @ pos.to(g.dtype), bgf @ neg.to(g.dtype)         # (b, T): counts (masks symmetric)
    valid = fg & (pos_n > 0) & (neg_n > 0)
    delta = pos_sums / pos_n.clamp_min(1) - neg_sums / neg_n.clamp_min(1)
    count = valid.sum(1)
    out = (delta * valid).sum(1) / count.clamp_min(1)
    bad = (fg.sum(1) < 2) | ((~fg).sum(1) < 1) | (count == 0)
    return out.masked_fill(bad, float("nan"))


def _resolve(variant: str, h: int, w: int, near, far, d_pos, d_neg) -> tuple[int, int, int, int]:
    if variant not in VARIANTS:
        raise MetricInputError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    r = _half(h, w)
    dn, df, dp, dg = (1, 6, 1, 6) if variant == "code" else (max(1, r - 1), r, r, r)
    return tuple(_check_int(name, dv if v is None else v) for name, v, dv in
                 (("near", near, dn), ("far", far, df), ("d_pos", d_pos, dp), ("d_neg", d_neg, dg)))


def spatial_metrics(tokens: torch.Tensor, names: Sequence[str] = SPATIAL_METRICS, grid: Sequence[int] | None = None,
                    *, masks: torch.Tensor | None = None, near: int | None = None, far: int | None = None,
                    dmax: int = 8, d_pos: int | None = None, d_neg: int | None = None, d_pos_min: int = 1,
                    sqrt: bool = True, variant: str = "code", chunk_size: int | None = None) -> dict:
    """Several metrics of ``tokens: (B, T, D)`` sharing one Gram matrix per chunk of images.

    Returns ``{name: (B,) float32}`` for ``names`` (a subset of :data:`SPATIAL_METRICS`); the keyword
    arguments are those of :func:`lds`, :func:`cds`, :func:`srss` and :func:`rmsc`.
    """
    tokens, h, w = _check_tokens(tokens, grid)
    unknown = [n for n in names if n not in SPATIAL_METRICS]
    if unknown or not names:
        raise MetricInputError(f"unknown spatial metric(s) {unknown or names!r}; choose from "
                                 f"{', '.join(SPATIAL_METRICS)}")
    near, far, d_pos, d_neg = _resolve(variant, h, w, near, far, d_pos, d_neg)
    if chunk_size is not None:
        _check_int("chunk_size", chunk_size)
    if "lds" in names:
        _need_far("LDS far", far, h, w)
    if "cds" in names and min(_check_int("dmax", dmax), h + w - 2) < 2:
        raise MetricInputError(f"CDS: a {h}x{w} grid with dmax={dmax} has fewer than 2 distances to fit a slope")
    fg = pos = neg = None
    if "srss" in names:
        fg = _foreground(masks, tokens)
        _need_far("SRSS d_neg", d_neg, h, w)
        dist = _distances(h, w, tokens.device)
        pos = ((dist >= _check_int("d_pos_min", d_pos_min, 0)) & (dist <= d_pos)).float()
        neg = (dist >= d_neg).float()
    out = {}
    if "lds" in names or "cds" in names or fg is not None:
        sums, out["srss"] = _pairwise(tokens, h, w, "lds" in names or "cds" in names, fg, pos, neg, chunk_size)
        if sums is not None:
            counts = pair_counts(h, w).to(tokens.device)
            out["lds"] = (_band_mean(sums, counts, 1, near) - _band_mean(sums, counts, far)).float()
            out["cds"] = _cds_fit(sums, counts, dmax, h, w) if "cds" in names else None
    if "rmsc" in names:
        out["rmsc"] = rmsc(tokens, (h, w), sqrt=sqrt, chunk_size=chunk_size)
    return {n: out[n] for n in names}


def _cds_fit(sums: torch.Tensor, counts: torch.Tensor, dmax: int, h: int, w: int) -> torch.Tensor:
    """``-slope`` of mean K per distance over d = 1..min(dmax, H+W-2): ``(B,)`` float32."""
    ds = torch.arange(1, min(dmax, h + w - 2) + 1, device=sums.device)
    g = sums[:, ds] / counts[ds]                                         # (B, K) mean K per distance
    x0 = ds.double() - ds.double().mean()
    return (-((g - g.mean(1, keepdim=True)) @ x0) / (x0 @ x0)).float()


def _foreground(masks, tokens: torch.Tensor) -> torch.Tensor:
    """``masks`` checked against ``tokens: (B, T, D)``, as a ``(B, T)`` bool foreground on the tokens' device."""
    if masks is None:
        raise MetricInputError("srss needs masks=(B, T) foreground masks")
    masks = torch.as_tensor(masks, device=tokens.device)
    if masks.shape != tokens.shape[:2]:
        raise MetricInputError(f"masks must be (B, T) = {tuple(tokens.shape[:2])}, got {tuple(masks.shape)}")
    return masks != 0
