"""Shared pieces of the probes: the error type, input checks, train-split statistics, batch gathering.

Feature matrices may be ``torch.Tensor`` (any device, any floating dtype) or ``numpy.ndarray``
(including ``np.memmap`` / ``np.load(..., mmap_mode="r")`` for data sets larger than memory). They are
never copied as a whole: statistics and finiteness checks run in chunks of rows, and training gathers
one mini-batch at a time. Every gathered batch is converted to float32 on the requested device — the
probes always compute in float32, whatever the storage dtype.
"""
from __future__ import annotations

import numbers
from typing import Any, Iterator, Union

import numpy as np
import torch

from repa_probe.analysis.errors import MetricInputError

Array = Union[torch.Tensor, np.ndarray]

STD_EPS = 1e-6  # a column whose training std is below this is treated as constant (std set to 1)


def check_features(x: Any, name: str, ndims: tuple[int, ...]) -> Array:
    """Return ``x`` unchanged if it is a numeric torch tensor / numpy array with ``x.ndim in ndims`` and at
    least one row; raise :class:`MetricInputError` otherwise (finiteness is checked later, in chunks)."""
    if not isinstance(x, (torch.Tensor, np.ndarray)):
        raise MetricInputError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.ndim not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        raise MetricInputError(f"{name} must be {want}, got shape {tuple(x.shape)}")
    kind = x.dtype.is_floating_point if isinstance(x, torch.Tensor) else np.issubdtype(x.dtype, np.floating)
    if not kind:
        raise MetricInputError(f"{name} must have a floating dtype, got {x.dtype}")
    if x.shape[0] == 0:
        raise MetricInputError(f"{name} is empty (0 samples)")
    if any(s == 0 for s in x.shape[1:]):
        raise MetricInputError(f"{name} has a zero-sized dimension: shape {tuple(x.shape)}")
    return x


def check_labels(y: Any, n: int, name: str, num_classes: int | None = None,
                 ignore_index: int | None = None) -> torch.Tensor:
    """Integer labels → int64 CPU tensor of the same shape.

    Raises :class:`MetricInputError` for non-integer dtypes, a first dimension other than ``n``, and (when
    ``num_classes`` is given) values outside ``[0, num_classes)`` other than ``ignore_index``.
    """
    if isinstance(y, np.ndarray):
        if not np.issubdtype(y.dtype, np.integer):
            raise MetricInputError(f"{name} must hold integers, got dtype {y.dtype}")
        y = torch.from_numpy(np.asarray(y, dtype=np.int64))
    elif isinstance(y, torch.Tensor):
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise MetricInputError(f"{name} must hold integers, got dtype {y.dtype}")
        y = y.detach().to("cpu", torch.int64)
    else:
        raise MetricInputError(f"{name} must be a torch.Tensor or numpy array, got {type(y).__name__}")
    if y.ndim == 0 or y.shape[0] != n:
        raise MetricInputError(f"{name} has {y.shape[0] if y.ndim else 'no'} entries but its features have {n} rows")
    if num_classes is not None and y.numel():
        bad = (y < 0) | (y >= num_classes)
        if ignore_index is not None:
            bad &= y != ignore_index
        if bool(bad.any()):
            v = int(y[bad][0])
            extra = f" or ignore_index={ignore_index}" if ignore_index is not None else ""
            raise MetricInputError(f"{name} contains class {v}, outside the declared classes 0..{num_classes - 1}"
                                  f"{extra}")
    return y


def check_num_classes(num_classes: Any) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise MetricInputError(f"num_classes must be an int >= 2, got {num_classes!r}")
    return int(num_classes)


def gather(x: Array, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rows ``idx`` (int64 CPU, any order) of ``x`` as a float32 tensor on ``device``: ``(len(idx), *x.shape[1:])``."""
    if isinstance(x, torch.Tensor):
        rows = x[idx.to(x.device)]
    else:
        rows = torch.from_numpy(np.ascontiguousarray(x[idx.numpy()]))
    return rows.to(device=device, dtype=torch.float32)


def chunks(n: int, size: int) -> Iterator[torch.Tensor]:
    """Consecutive index ranges ``[i, i + size)`` covering ``0..n-1`` as int64 CPU tensors."""
    for start in range(0, n, size):
        yield torch.arange(start, min(start + size, n))


def rows_per_chunk(x: Array, budget: int = 1 << 24) -> int:
    """How many rows of ``x`` fit in about ``budget`` float32 values (at least one)."""
    per_row = int(np.prod(x.shape[1:])) if x.ndim > 1 else 1
    return max(1, budget // max(per_row, 1))


def check_finite(x: Array, name: str, device: torch.device) -> None:
    """Raise :class:`MetricInputError` naming the first row with a NaN / inf value (chunked pass)."""
    for idx in chunks(x.shape[0], rows_per_chunk(x)):
        b = gather(x, idx, device)
        ok = torch.isfinite(b).flatten(1).all(dim=1)
        if not bool(ok.all()):
            row = int(idx[(~ok).nonzero()[0, 0].cpu()])
            raise MetricInputError(f"{name} has NaN or inf values (first at row {row})")


def channel_stats(x: Array, name: str, channel_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of ``x`` over every other axis, checking finiteness on the way.

    ``channel_dim`` is the axis of the channels in ``x`` (1 for ``(N, D)`` and ``(N, D, h, w)``, 2 for
    ``(N, T, D)``). Chunk statistics in float32 (two-pass), merged in float64; returns float32 ``(D,)``
    tensors on ``device``. Constant channels (std < ``STD_EPS``) get std 1, so standardising maps them to 0
    instead of dividing by 0.
    """
    total = torch.zeros((), dtype=torch.float64, device=device)
    s1 = s2 = None
    for idx in chunks(x.shape[0], rows_per_chunk(x)):
        b = gather(x, idx, device)
        if not bool(torch.isfinite(b).all()):
            ok = torch.isfinite(b).flatten(1).all(dim=1)
            row = int(idx[(~ok).nonzero()[0, 0].cpu()])
            raise MetricInputError(f"{name} has NaN or inf values (first at row {row})")
        b = b.movedim(channel_dim, -1).reshape(-1, b.shape[channel_dim])
        if s1 is None:
            s1 = torch.zeros(b.shape[1], dtype=torch.float64, device=device)
            s2 = torch.zeros_like(s1)
        mu_b = b.mean(0)  # chunk statistics in float32, two-pass (centred first, so accurate)
        d = b - mu_b
        mu_b, m2_b = mu_b.double(), (d * d).sum(0).double()
        # Chan et al. parallel update of (count, mean, M2) in float64 across chunks
        n_b = torch.tensor(float(b.shape[0]), dtype=torch.float64, device=device)
        delta = mu_b - s1
        new_total = total + n_b
        s2 = s2 + m2_b + delta ** 2 * total * n_b / new_total
        s1 = s1 + delta * n_b / new_total
        total = new_total
    assert s1 is not None and s2 is not None
    std = (s2 / total).sqrt()
    std = torch.where(std < STD_EPS, torch.ones_like(std), std)
    return s1.float(), std.float()
