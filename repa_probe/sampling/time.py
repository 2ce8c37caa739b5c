"""Per-family time and output conversions of the samplers (the one place to switch to ``repa_probe.timesteps``).

Samplers run in REPA time (t = 0 data, t = 1 noise) for flow models and in DDPM steps for DiT. This module
says what each family's network receives and how its output becomes REPA's velocity:

* ``"REPA"`` (ours, REPA): receives ``t``; returns ``v = eps - x``.
* ``"SiT"`` (official willisma/SiT, t = 0 noise): receives ``1 - t``; returns ``u = -v``.
* ``"DiT"``: receives the original DDPM step (0..999); its guidance-interval time is ``step / (T - 1)``.
"""
from __future__ import annotations

import torch

FLOW_FAMILIES = ("REPA", "SiT")
DDPM_FAMILIES = ("DiT",)


def flow_model_time(family: str, t: torch.Tensor) -> torch.Tensor:
    """REPA time ``t: (B,)`` -> what a flow model of ``family`` receives, same shape and dtype."""
    return 1.0 - t if family == "SiT" else t


def flow_velocity(family: str, out: torch.Tensor) -> torch.Tensor:
    """A flow model's output ``(B, C, H, W)`` -> REPA velocity ``dx/dt`` (t = 1 noise)."""
    return -out if family == "SiT" else out


def ddpm_step_time(step: int, num_timesteps: int) -> float:
    """Original DDPM step -> user time in [0, 1] (for the guidance interval): ``step / (T - 1)``."""
    return float(step) / float(num_timesteps - 1)
