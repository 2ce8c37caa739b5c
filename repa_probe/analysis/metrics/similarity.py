"""Representation-alignment metrics between two sets of features of the same N samples.

Every metric takes two feature matrices ``a: (N, D_a)`` and ``b: (N, D_b)`` (torch tensors or numpy arrays;
row ``i`` of both describes sample ``i``), uses them exactly as given (no normalisation inside; call
:func:`prepare_features` first for the PRH/REPA convention) and returns a Python float. The definitions are
those of minyoungg/platonic-rep ``metrics.AlignmentMetrics`` and agree with it to ~1e-7 (float64):

* linear kernels ``K = a aᵀ``, ``L = b bᵀ`` (uncentred);
* kNN by inner product; ``cknna(unbiased=True)``, ``mutual_knn`` and ``cycle_knn`` exclude self;
* CKNNA masks the raw kernels with the asymmetric row mask ``M = M_K ∘ M_L`` and compares them with the
  unbiased HSIC of Song et al. (2012, Eq. 5), transpose included; ``+1e-6`` in every denominator.

Nothing of size N×N is ever formed. kNN lists come from ``chunk_size × chunk_size`` Gram blocks of the
upper block triangle (the Gram is symmetric, so each block serves its rows and, transposed, its columns;
``torch.topk`` per block merged into a running top-k, on the inputs' device and in their dtype), and the
masked HSIC is evaluated in O(N·k) from the N·k masked entries, accumulated in float64:
``Σ(K̃∘L̃ᵀ)`` by looking each entry's transpose up in the sorted entry keys, ``ΣK̃``, ``ΣL̃`` directly, and
``Σ(K̃L̃) = Σ_m colsum(K̃)_m · rowsum(L̃)_m``. Linear CKA uses the feature-space form (D_a×D_b products
accumulated in float64 over row chunks) when that is cheaper than the N×N Gram matrices.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from repa_probe.analysis.errors import MetricInputError
from repa_probe.reports.bootstrap import interval

__all__ = ["MetricInputError", "cknna", "mutual_knn", "cycle_knn", "cka", "unbiased_cka",
           "prepare_features", "bootstrap", "bootstrap_replicates"]

_EPS = 1e-6                 # platonic-rep's denominator epsilon (CKA and CKNNA)
_CHUNK_ELEMENTS = 1 << 25   # default working-set budget: ~32M elements per Gram / feature chunk


# ----------------------------------------------------------------------------------------------- validation
def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise MetricInputError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if not x.is_floating_point():
        raise MetricInputError(f"{name}: expected floating-point features, got dtype {x.dtype}")
    return x


def _check_pair(a, b, topk: int | None = None, min_topk: int = 1, min_n: int = 2):
    """Validate ``a: (N, D_a)``, ``b: (N, D_b)`` (and ``topk``); return them as tensors."""
    a, b = _as_tensor(a, "a"), _as_tensor(b, "b")
    for name, x in (("a", a), ("b", b)):
        if x.ndim != 2:
            raise MetricInputError(f"{name}: expected a 2-D (N, D) feature matrix, got shape {tuple(x.shape)}")
    if a.shape[0] != b.shape[0]:
        raise MetricInputError(f"a and b must describe the same samples: N = {a.shape[0]} vs {b.shape[0]}")
    if a.device != b.device:
        raise MetricInputError(f"a and b are on different devices: {a.device} vs {b.device}")
    n = a.shape[0]
    if n < min_n:
        raise MetricInputError(f"need at least {min_n} samples, got N = {n}")
    if topk is not None:
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < min_topk:
            raise MetricInputError(f"topk must be an integer >= {min_topk}, got {topk!r}")
        if topk >= n:
            raise MetricInputError(f"topk = {topk} needs N > topk samples, got N = {n}")
    for name, x in (("a", a), ("b", b)):
        if not bool(torch.isfinite(x).all()):
            raise MetricInputError(f"{name}: features contain NaN or inf")
    return a, b


def _rows_per_chunk(n_cols: int, chunk_size: int | None) -> int:
    if chunk_size is None:
        return max(1, _CHUNK_ELEMENTS // max(1, n_cols))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise MetricInputError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    return chunk_size


# ---------------------------------------------------------------------------------------------- kNN + sparse
def _knn(x: torch.Tensor, k: int, exclude_self: bool, chunk_size: int | None):
    """Inner-product kNN of every row of ``x: (N, D)``.

    Returns ``values: (N, k)`` (``x_i · x_j``, dtype of x) and ``indices: (N, k)`` int64, descending.
    The Gram matrix is visited in ``c × c`` blocks (``c = chunk_size``; default: N when N <= 4096, else
    ``N/8`` capped by the memory budget) of the upper block triangle only: block ``(I, J)`` gives
    candidates to the rows of ``I`` and, transposed, to the rows of ``J``; a running top-k is merged per
    block. With ``exclude_self`` the diagonal is -inf. Exact ties are broken by ``torch.topk``.
    """
    n = x.shape[0]
    if chunk_size is None:                 # one block for small N; >= 8 blocks per side for large N
        c = n if n <= 4096 else min(-(-n // 8), math.isqrt(_CHUNK_ELEMENTS))
    else:
        c = _rows_per_chunk(n, chunk_size)
    values = torch.full((n, k), float("-inf"), dtype=x.dtype, device=x.device)
    indices = torch.zeros(n, k, dtype=torch.long, device=x.device)

    def merge(start, stop, cand_v, cand_i):
        v = torch.cat([values[start:stop], cand_v], dim=1)
        top_v, pos = torch.topk(v, k, dim=1)
        values[start:stop] = top_v
        indices[start:stop] = torch.gather(torch.cat([indices[start:stop], cand_i], dim=1), 1, pos)

    starts = list(range(0, n, c))
    for bi, si in enumerate(starts):
        ei = min(si + c, n)
        for sj in starts[bi:]:
            ej = min(sj + c, n)
            gram = x[si:ei] @ x[sj:ej].T                              # (c_i, c_j)
            if sj == si and exclude_self:
                gram.diagonal().fill_(float("-inf"))
            v, i = torch.topk(gram, min(k, ej - sj), dim=1)
            merge(si, ei, v, i + sj)
            if sj != si:                                              # the transposed block (J, I)
                v, i = torch.topk(gram, min(k, ei - si), dim=0)
                merge(sj, ej, v.T, i.T + si)
    return values, indices


def _keys(indices: torch.Tensor) -> torch.Tensor:
    """Flattened entry keys ``i * N + j`` of a kNN list ``indices: (N, k)`` → ``(N·k,)`` int64."""
    n = indices.shape[0]
    rows = torch.arange(n, device=indices.device).unsqueeze(1)
    return (rows * n + indices).reshape(-1)


def _lookup(sorted_keys: torch.Tensor, query: torch.Tensor):
    """Membership of ``query`` keys in ``sorted_keys`` → ``(found: bool, position: int64)``, same shape."""
    if sorted_keys.numel() == 0:
        return torch.zeros_like(query, dtype=torch.bool), torch.zeros_like(query)
    pos = torch.searchsorted(sorted_keys, query).clamp_(max=sorted_keys.numel() - 1)
    return sorted_keys.index_select(0, pos) == query, pos


def _sparse_hsic(n: int, rows, cols, kv, lv, unbiased: bool) -> torch.Tensor:
    """HSIC of two N×N matrices that are zero except at the entries ``(rows[e], cols[e])``.

    ``kv, lv: (E,)`` float64 are the two matrices' values there (entries unique; an entry whose values are
    0 contributes nothing, so callers zero entries instead of removing them). Same formulas as
    platonic-rep's dense ``hsic_unbiased`` (diagonal dropped, transpose in the first term) and
    ``hsic_biased`` (``tr(K H L H)``), in O(E log E).
    """
    if unbiased:
        off = rows != cols
        kv, lv = kv * off, lv * off
    keys = rows * n + cols
    order = torch.argsort(keys)
    found, pos = _lookup(keys.index_select(0, order), cols * n + rows)   # where is (j, i) for entry (i, j)?
    lv_t = lv.index_select(0, order.index_select(0, pos))                # L at (j, i) where found
    trace_term = (kv * lv_t * found).sum()                              # Σ_ij K_ij L_ji
    sum_k, sum_l = kv.sum(), lv.sum()
    zeros = torch.zeros(n, dtype=torch.float64, device=kv.device)
    col_k, row_l = zeros.index_add(0, cols, kv), zeros.index_add(0, rows, lv)
    k_l = (col_k * row_l).sum()                                       # Σ (K L) = 1ᵀ K L 1
    if unbiased:
        return (trace_term + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 * k_l / (n - 2)) / (n * (n - 3))
    row_k, col_l = zeros.index_add(0, rows, kv), zeros.index_add(0, cols, lv)
    return trace_term - (k_l + (row_k * col_l).sum()) / n + sum_k * sum_l / (n * n)


def _ratio(hsic_kl: torch.Tensor, hsic_kk: torch.Tensor, hsic_ll: torch.Tensor) -> float:
    """``kl / (sqrt(kk·ll) + 1e-6)``; NaN (as in platonic-rep) when kk·ll < 0."""
    return float(hsic_kl) / (float(torch.sqrt(hsic_kk * hsic_ll)) + _EPS)


# --------------------------------------------------------------------------------------------------- metrics
def cknna(a, b, topk: int = 10, unbiased: bool = True, *, chunk_size: int | None = None) -> float:
    """Centred kernel nearest-neighbour alignment (Huh et al. 2024) of ``a: (N, D_a)``, ``b: (N, D_b)``.

    ``sim(K, L) = HSIC(M∘K, M∘L)`` with ``M = M_K ∘ M_L`` the (asymmetric) rows' top-``topk`` masks;
    result ``sim(K, L) / (sqrt(sim(K, K)·sim(L, L)) + 1e-6)``. ``unbiased=True`` (default) excludes self from
    the kNN and uses the unbiased HSIC; ``unbiased=False`` includes self and uses the biased HSIC (dominated
    by the diagonal, ~0.7 for independent data: not recommended). ``chunk_size``: Gram block size (rows).
    """
    a, b = _check_pair(a, b, topk, min_topk=2, min_n=4 if unbiased else 2)
    n = a.shape[0]
    vals_k, idx_k = _knn(a, topk, unbiased, chunk_size)
    vals_l, idx_l = _knn(b, topk, unbiased, chunk_size)
    keys_k, keys_l = _keys(idx_k), _keys(idx_l)
    kv_all, lv_all = vals_k.reshape(-1).double(), vals_l.reshape(-1).double()

    order_l = torch.argsort(keys_l)
    found, pos = _lookup(keys_l.index_select(0, order_l), keys_k)    # entries of M_K that are also in M_L
    lv_at_k = lv_all.index_select(0, order_l.index_select(0, pos))   # L at those entries (where found)
    rows_k, cols_k = keys_k // n, keys_k % n
    rows_l, cols_l = keys_l // n, keys_l % n
    sim_kl = _sparse_hsic(n, rows_k, cols_k, kv_all * found, lv_at_k * found, unbiased)   # M = M_K ∘ M_L
    sim_kk = _sparse_hsic(n, rows_k, cols_k, kv_all, kv_all, unbiased)
    sim_ll = _sparse_hsic(n, rows_l, cols_l, lv_all, lv_all, unbiased)
    return _ratio(sim_kl, sim_kk, sim_ll)


def mutual_knn(a, b, topk: int = 10, *, chunk_size: int | None = None) -> float:
    """Mean over samples of ``|kNN_a(i) ∩ kNN_b(i)| / topk`` (inner-product kNN, self excluded).

    ``a: (N, D_a)``, ``b: (N, D_b)``; chance level ≈ ``topk / (N - 1)``.
    """
    a, b = _check_pair(a, b, topk)
    n = a.shape[0]
    keys_a = torch.sort(_keys(_knn(a, topk, True, chunk_size)[1])).values
    found, _ = _lookup(keys_a, _keys(_knn(b, topk, True, chunk_size)[1]))
    return float(found.double().sum()) / (n * topk)


def cycle_knn(a, b, topk: int = 10, *, chunk_size: int | None = None) -> float:
    """Fraction of samples ``i`` with ``i ∈ kNN_a(j)`` for some ``j ∈ kNN_b(i)`` (self excluded).

    ``a: (N, D_a)``, ``b: (N, D_b)``; platonic-rep's ``compute_knn_accuracy(knn_A[knn_B])``.
    """
    a, b = _check_pair(a, b, topk)
    n = a.shape[0]
    keys_a = torch.sort(_keys(_knn(a, topk, True, chunk_size)[1])).values
    idx_b = _knn(b, topk, True, chunk_size)[1]                        # (N, k): j ∈ kNN_b(i)
    back = idx_b * n + torch.arange(n, device=idx_b.device).unsqueeze(1)   # key (j, i)
    found, _ = _lookup(keys_a, back.reshape(-1))
    return float(found.reshape(n, topk).any(dim=1).double().mean())


def _feature_stats(x: torch.Tensor, y: torch.Tensor, rows: int):
    """Float64 ``(xᵀy, xᵀx, yᵀy, rowsq_x (N,), rowsq_y (N,), K1 (N,), L1 (N,))`` of the column-centred
    ``x: (N, D_x)``, ``y: (N, D_y)``, accumulated over ``rows``-row chunks; ``K1 = x (Σ_i x_i)``."""
    n = x.shape[0]
    chunks = lambda t: (t[s:s + rows].double() for s in range(0, n, rows))
    mean_x = sum(c.sum(0) for c in chunks(x)) / n
    mean_y = sum(c.sum(0) for c in chunks(y)) / n
    sum_x = sum((c - mean_x).sum(0) for c in chunks(x))
    sum_y = sum((c - mean_y).sum(0) for c in chunks(y))
    xy = xx = yy = 0.0
    sq_x, sq_y, kx, ly = [], [], [], []
    for cx, cy in zip(chunks(x), chunks(y)):
        cx, cy = cx - mean_x, cy - mean_y
        xy, xx, yy = xy + cx.T @ cy, xx + cx.T @ cx, yy + cy.T @ cy
        sq_x.append((cx * cx).sum(1)), sq_y.append((cy * cy).sum(1))
        kx.append(cx @ sum_x), ly.append(cy @ sum_y)
    return xy, xx, yy, torch.cat(sq_x), torch.cat(sq_y), torch.cat(kx), torch.cat(ly)


def _hsic_unbiased_features(n, xy, sq_x, sq_y, kx, ly):
    """Unbiased HSIC of linear kernels from feature statistics (see :func:`_feature_stats`)."""
    trace_term = (xy * xy).sum() - (sq_x * sq_y).sum()                 # Σ K̃∘L̃ᵀ
    sum_k, sum_l = kx.sum() - sq_x.sum(), ly.sum() - sq_y.sum()       # Σ K̃, Σ L̃
    k_l = ((kx - sq_x) * (ly - sq_y)).sum()                           # 1ᵀ K̃ L̃ 1
    return (trace_term + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 * k_l / (n - 2)) / (n * (n - 3))


def _dense_hsic(k: torch.Tensor, l: torch.Tensor, unbiased: bool) -> torch.Tensor:
    """HSIC of symmetric ``k, l: (N, N)`` float64 (platonic-rep formulas)."""
    n = k.shape[0]
    if unbiased:
        k, l = k.clone().fill_diagonal_(0), l.clone().fill_diagonal_(0)
        kl = (k.sum(0) * l.sum(1)).sum()
        return ((k * l.T).sum() + k.sum() * l.sum() / ((n - 1) * (n - 2)) - 2.0 * kl / (n - 2)) / (n * (n - 3))
    kh = k - k.mean(1, keepdim=True)                                   # K H
    lh = l - l.mean(1, keepdim=True)                                   # L H
    return (kh * lh.T).sum()                                           # tr(K H L H)


def cka(a, b, unbiased: bool = False, *, chunk_size: int | None = None) -> float:
    """Linear-kernel CKA ``HSIC(K, L) / (sqrt(HSIC(K, K)·HSIC(L, L)) + 1e-6)`` of ``a: (N, D_a)``, ``b: (N, D_b)``.

    ``unbiased=False``: biased HSIC ``tr(KHLH)`` (platonic-rep ``cka``); ``unbiased=True``: Song et al.'s
    unbiased HSIC (platonic-rep ``unbiased_cka``). Float64 throughout; uses ``‖aᵀb‖²``-type feature-space
    sums when ``N² > D_a·D_b``, else the N×N Gram matrices. Both HSICs are invariant to translating the
    features, so the feature-space path centres them first for accuracy.
    """
    a, b = _check_pair(a, b, None, min_n=4 if unbiased else 2)
    n = a.shape[0]
    if n * n <= a.shape[1] * b.shape[1]:
        k, l = a.double() @ a.double().T, b.double() @ b.double().T
        return _ratio(_dense_hsic(k, l, unbiased), _dense_hsic(k, k, unbiased), _dense_hsic(l, l, unbiased))
    rows = _rows_per_chunk(max(a.shape[1], b.shape[1]), chunk_size)
    xy, xx, yy, sq_a, sq_b, ka, lb = _feature_stats(a, b, rows)
    if not unbiased:                                                  # tr(K H L H) = ‖a_cᵀ b_c‖²
        return _ratio((xy * xy).sum(), (xx * xx).sum(), (yy * yy).sum())
    return _ratio(_hsic_unbiased_features(n, xy, sq_a, sq_b, ka, lb),
                  _hsic_unbiased_features(n, xx, sq_a, sq_a, ka, ka),
                  _hsic_unbiased_features(n, yy, sq_b, sq_b, lb, lb))


def unbiased_cka(a, b, *, chunk_size: int | None = None) -> float:
    """``cka(a, b, unbiased=True)`` (platonic-rep ``unbiased_cka``)."""
    return cka(a, b, unbiased=True, chunk_size=chunk_size)


# ------------------------------------------------------------------------------------------ feature prep
def prepare_features(x, l2: bool = True, clip_quantile: float | None = 0.95, exact: bool = False):
    """PRH/REPA feature preparation: platonic-rep ``remove_outliers`` clamp, then row L2 normalisation.

    ``x: (N, ...)`` (sample axis first, e.g. ``(N, D)`` or ``(N, L, D)``), torch or numpy, floating point;
    returns the same type, shape and dtype. Clamp: every element to ``±q_val`` where, with ``exact=False``,
    ``q_val`` is the mean over samples of each sample's ``clip_quantile`` quantile of ``|x|`` (linear
    interpolation, over all its non-sample entries), and with ``exact=True`` the element of rank
    ``int(clip_quantile · numel)`` of the sorted ``|x|``. ``clip_quantile=None`` or ``1`` skips the clamp.
    ``l2``: ``x / max(‖x‖₂, 1e-12)`` along the last axis (``F.normalize``).
    """
    is_numpy = isinstance(x, np.ndarray)
    t = _as_tensor(x, "x")
    if t.ndim < 2 or t.shape[0] < 1 or t.numel() == 0:
        raise MetricInputError(f"x: expected a non-empty (N, ...) array with N samples first, got {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise MetricInputError("x: features contain NaN or inf")
    if clip_quantile is not None and clip_quantile != 1:
        if not 0 < clip_quantile < 1:
            raise MetricInputError(f"clip_quantile must be in (0, 1] or None, got {clip_quantile!r}")
        flat = t.reshape(t.shape[0], -1)
        if exact:
            rank = int(clip_quantile * flat.numel())                  # 0-based, as platonic-rep
            q_val = float(flat.abs().reshape(-1).kthvalue(rank + 1).values)
        else:
            m = flat.shape[1]
            pos = clip_quantile * (m - 1)
            lo, frac = math.floor(pos), pos - math.floor(pos)
            hi = min(lo + 1, m - 1)
            total, rows = 0.0, _rows_per_chunk(m, None)
            for s in range(0, flat.shape[0], rows):
                mag = flat[s:s + rows].abs()
                v_lo = mag.kthvalue(lo + 1, dim=1).values.double()
                v_hi = mag.kthvalue(hi + 1, dim=1).values.double()
                total += float((v_lo + frac * (v_hi - v_lo)).sum())
            q_val = total / flat.shape[0]
        t = t.clamp(-q_val, q_val)
    if l2:
        t = F.normalize(t, p=2, dim=-1)
    return t.numpy() if is_numpy else t


# --------------------------------------------------------------------------------------------- bootstrap
def bootstrap(metric_fn: Callable, a, b, n: int = 100, seed: int = 0, ci: float = 0.95,
              fraction: float = 0.5) -> tuple[float, float, float]:
    """Point value and a ``ci`` confidence interval for ``metric_fn(a, b)`` by half-sampling.

    ``a: (N, D_a)``, ``b: (N, D_b)``; ``metric_fn(a_sub, b_sub) -> float`` (e.g.
    ``functools.partial(cknna, topk=10)``). Each of the ``n`` replicates keeps a random ``fraction`` of the
    rows **without replacement** (rows in their original order; numpy ``default_rng(seed)``).

    Why not the classic with-replacement bootstrap: a resample holds ~37% duplicated rows, and a duplicate
    is an exact copy in both spaces, so it becomes its twin's nearest neighbour in a and in b at once; that
    inflates mutual_knn / CKNNA systematically (and the unbiased HSIC sees its off-diagonal copies).
    Subsampling without replacement has no duplicates. The kNN metrics also depend on N (neighbourhoods
    widen on a subsample), so the replicate distribution is re-centred on the full-data value:
    ``low/high = value + s·(q_{α/2,1−α/2} − mean)`` with ``s = sqrt(f / (1 − f))`` the delete-d jackknife
    variance factor (Shao & Wu 1989), which is 1 for the default ``f = 0.5``
    (:func:`repa_probe.reports.bootstrap.interval`). Returns ``(value, low, high)``.
    """
    if not 0 < ci < 1:
        raise MetricInputError(f"ci must be in (0, 1), got {ci!r}")
    value, reps, scale = bootstrap_replicates(metric_fn, a, b, n, seed, fraction)
    low, high = interval(value, reps, scale, ci)
    return value, low, high


def bootstrap_replicates(metric_fn: Callable, a, b, n: int = 100, seed: int = 0,
                         fraction: float = 0.5) -> tuple[float, np.ndarray, float]:
    """``(value, replicates (n,), scale)`` of :func:`bootstrap`'s half-sampling. The row subsets depend only on
    ``(N, n, seed, fraction)``, so two models analysed on the same images get the same subsets (a paired
    bootstrap of their difference: :func:`repa_probe.reports.bootstrap.difference`)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise MetricInputError(f"n (replicates) must be an integer >= 2, got {n!r}")
    if not 0 < fraction < 1:
        raise MetricInputError(f"fraction must be in (0, 1), got {fraction!r}")
    a, b = _check_pair(a, b)
    n_rows = a.shape[0]
    m = int(round(fraction * n_rows))
    value = float(metric_fn(a, b))
    rng = np.random.default_rng(seed)
    reps = np.empty(n)
    for r in range(n):
        idx = torch.from_numpy(np.sort(rng.choice(n_rows, size=m, replace=False))).to(a.device)
        reps[r] = float(metric_fn(a.index_select(0, idx), b.index_select(0, idx)))
    if not np.all(np.isfinite(reps)) or not math.isfinite(value):
        raise RuntimeError(f"bootstrap: metric returned a non-finite value ({int((~np.isfinite(reps)).sum())} "
                           f"of {n} replicates; full data: {value})")
    return value, reps, math.sqrt(fraction / (1.0 - fraction))
