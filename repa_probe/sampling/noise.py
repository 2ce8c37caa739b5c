"""Seeded noise keyed by dataset index: the same noise for sample ``i`` whatever the batch, device or process.

Used by sampling to folders (the initial noise of sample ``i``) and by the analyses (the noise of ``x_t``
for image ``i``), so that every checkpoint and timestep sees the same noise for the same image.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence, Union

import torch

__all__ = ["seeded_noise", "CLASS_TOKEN_KEY", "NoiseSource", "step_noise"]

#: per-step noise: ``noise(step, like) -> tensor shaped like ``like`` (B, C, H, W)`` (see analysis.generate)
NoiseSource = Callable[[int, torch.Tensor], torch.Tensor]

_M32 = 0xFFFFFFFF
#: REG models: the noise of sample i's class token is ``seeded_noise(seed ^ CLASS_TOKEN_KEY, i, (D,))``, independent
#: of its latents' noise (initial noise when sampling, the noise of x_t's class token in the analyses)
CLASS_TOKEN_KEY = 0x43C15


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for int64 ``x`` in [0, 2**32) without int64 overflow (16-bit halves of c)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (``lowbias32``) applied elementwise to int64 ``x`` in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


_COUNTERS: dict = {}


def _counter_hashes(numel: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Hashes of the element counters ``2j`` and ``2j + 1`` (``(numel,)`` int64), cached per device."""
    key = (numel, str(device))
    if key not in _COUNTERS:
        j = torch.arange(numel, device=device, dtype=torch.int64)
        _COUNTERS.clear()
        _COUNTERS[key] = (_hash32((2 * j) & _M32), _hash32((2 * j + 1) & _M32))
    return _COUNTERS[key]


def seeded_noise(seed: int, indices: torch.Tensor, shape: Sequence[int], device=None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise ``(B, *shape)`` whose row ``b`` depends only on ``(seed, indices[b])``.

    A counter-based generator: element ``j`` of sample ``i`` is Box-Muller applied to two 32-bit hashes
    of ``(seed, i, j)``. Vectorised (no loop over samples), identical on every device and for every
    batch composition. ``indices: (B,)`` integer dataset indices.
    """
    idx = torch.as_tensor(indices, device=device).to(torch.int64).reshape(-1)
    if idx.numel() and int(idx.min()) < 0:
        raise ValueError("seeded_noise: dataset indices must be >= 0")
    numel = math.prod(int(s) for s in shape)
    key = _hash32(torch.tensor(int(seed) & _M32, device=idx.device, dtype=torch.int64) ^ 0x5BD1E995)
    base = _hash32(_hash32(key ^ (idx & _M32)) ^ ((idx >> 32) & _M32))          # (B,)
    c1, c2 = _counter_hashes(numel, idx.device)                                  # (numel,) each
    u1 = (_hash32(base[:, None] ^ c1).double() + 0.5) / 2.0 ** 32                  # (B, numel) in (0, 1)
    u2 = (_hash32(base[:, None] ^ c2).double() + 0.5) / 2.0 ** 32
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return z.reshape(idx.numel(), *shape).to(dtype)


def step_noise(generator: Union[torch.Generator, NoiseSource, None], draw_dtype: torch.dtype) -> NoiseSource:
    """The samplers' per-step N(0, I) draws: from a ``torch.Generator`` (or the global RNG when None) as the
    official code draws them (``draw_dtype``: float64 for REPA's SDE, float32 for DiT), or from a user
    ``NoiseSource`` (per-sample seeding)."""
    if generator is None or isinstance(generator, torch.Generator):
        return lambda step, like: torch.randn(like.shape, generator=generator, dtype=draw_dtype,
                                              device=like.device).to(like.dtype)
    return lambda step, like: generator(step, like).to(like.dtype)
