"""REPA's flow samplers (``samplers.py``) in REPA time (t = 1 noise -> t = 0 data), float64 state.

* :func:`euler` — ``euler_sampler``: grid ``linspace(1, 0, steps + 1)``, ``x <- x + (t_next - t) v``; with
  ``heun`` the trapezoid correction on every step but the last (2 * steps - 1 network evaluations). With a
  ``timestep_shift`` s > 0 the grid is LightningDiT's shifted one (:func:`shift_time`), which their sampler
  (torchdiffeq's fixed-grid Euler over ``linspace(0, 1, N)`` in SiT time, N = steps + 1) integrates.
* :func:`euler_maruyama` — ``euler_maruyama_sampler``: grid ``linspace(1, 0.04, steps)`` then 0; diffusion
  ``w = 2t``, score from the velocity, drift ``v - w s / 2``, noise ``sqrt(w) sqrt(|dt|) eps`` drawn before the
  network call; the last step (0.04 -> 0) is the mean only. Equals SiT's sigma-form Euler SDE, Mean last step.

``velocity(x, t, active) -> (B, C, H, W)`` float64 REPA velocity (guided when ``active``), see ``sample``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

SDE_LAST_STEP = 0.04


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """LightningDiT's timestep shift in REPA time: ``t / (s + (1 - s) t)`` (0 and 1 stay put; s < 1 spends
    more steps near the noise). Theirs is ``s u / (1 + (s - 1) u)`` on SiT time u = 1 - t, the same map;
    it is SD3's shift with factor 1 / s. ``shift = 0`` means off (their convention)."""
    return t if shift == 0 else t / (shift + (1.0 - shift) * t)


def euler(velocity: Callable, x: torch.Tensor, steps: int, heun: bool, active: Callable,
          timestep_shift: float = 0.0) -> torch.Tensor:
    """Probability-flow ODE from noise ``x: (B, C, H, W)`` float64; returns float64 ``(B, C, H, W)``."""
    ts = shift_time(torch.linspace(1, 0, steps + 1, dtype=torch.float64), timestep_shift).tolist()
    for i in range(steps):
        t_cur, t_next = ts[i], ts[i + 1]
        on = active(t_cur)
        d_cur = velocity(x, t_cur, on)
        x_next = x + (t_next - t_cur) * d_cur
        if heun and i < steps - 1:
            d_prime = velocity(x_next, t_next, on)
            x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
        x = x_next
    return x


def path_coefficients(path: str, t: float) -> tuple[float, float, float, float]:
    """``(alpha, d_alpha, sigma, d_sigma)`` of the interpolant ``x_t = alpha x + sigma eps`` at REPA time t."""
    if path == "linear":
        return 1.0 - t, -1.0, t, 1.0
    h = t * math.pi / 2
    return math.cos(h), -math.pi / 2 * math.sin(h), math.sin(h), math.pi / 2 * math.cos(h)


def sde_drift(v: torch.Tensor, x: torch.Tensor, t: float, path: str) -> torch.Tensor:
    """REPA's reverse-SDE drift ``v - (w / 2) score`` with ``w = 2t`` and the score from the velocity."""
    alpha, d_alpha, sigma, d_sigma = path_coefficients(path, t)
    ratio = alpha / d_alpha
    var = sigma ** 2 - ratio * d_sigma * sigma
    score = (ratio * v - x) / var
    return v - 0.5 * (2.0 * t) * score


def euler_maruyama(velocity: Callable, x: torch.Tensor, steps: int, active: Callable, noise: Callable,
                   path: str = "linear") -> torch.Tensor:
    """Euler–Maruyama from noise ``x: (B, C, H, W)`` float64; ``noise(step, x)`` gives float64 N(0, I) like x."""
    ts = torch.linspace(1.0, SDE_LAST_STEP, steps, dtype=torch.float64).tolist() + [0.0]
    for i in range(steps - 1):
        t_cur, t_next = ts[i], ts[i + 1]
        dt = t_next - t_cur
        deps = noise(i, x) * math.sqrt(abs(dt))
        d_cur = sde_drift(velocity(x, t_cur, active(t_cur)), x, t_cur, path)
        x = x + d_cur * dt + math.sqrt(2.0 * t_cur) * deps
    t_cur = ts[-2]
    d_cur = sde_drift(velocity(x, t_cur, active(t_cur)), x, t_cur, path)
    return x + (0.0 - t_cur) * d_cur
