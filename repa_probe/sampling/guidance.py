"""Classifier-free guidance: ``u + w (c - u)`` on the first guided channels, the batch doubled only when active."""
from __future__ import annotations

import dataclasses

import torch

from repa_probe.errors import ReproError

#: channels guided by default, per time convention: REPA guides all of them; DiT's (ddpm) and SiT's
#: ``forward_with_cfg`` guide only the first 3 (kept "for exact reproducibility" of their papers' numbers).
DEFAULT_CFG_CHANNELS = {"repa": "all", "sit": 3, "ddpm": 3}


class SamplingError(ReproError, ValueError):
    """Bad input to a sampler (method, steps, guidance, shapes); one-line message naming the option."""


def null_class(model) -> int:
    """The model's null (unconditional) label, ``num_classes``; an error when its label table has no such row."""
    n = int(model.num_classes)
    table = getattr(model, "y_embedder", None)
    rows = getattr(table, "num_rows", None)
    if rows is not None and rows <= n:
        raise SamplingError(f"classifier-free guidance needs a null class, but this model was built without one "
                            f"(class_dropout_prob = 0, {rows} label rows for {n} classes): use --cfg-scale 1")
    return n


@dataclasses.dataclass(frozen=True)
class Guidance:
    """CFG settings: ``scale`` w, ``interval`` (low, high) in REPA time (t = 1 noise), ``channels`` guided
    (the first k prediction channels; the remaining output channels are the conditional output)."""

    scale: float
    interval: tuple[float, float]
    channels: int | None
    null: int

    def active(self, t: float) -> bool:
        """Whether the batch is doubled at REPA time ``t`` (REPA's test: low <= t <= high, w != 1)."""
        return self.scale != 1.0 and self.interval[0] <= t <= self.interval[1]


def make_guidance(model, cfg_scale: float, interval, channels, in_channels: int) -> Guidance:
    """Validate the options and build a :class:`Guidance` (``channels``: "auto" (the convention's default), "all" or k)."""
    lo, hi = (float(v) for v in interval)
    if not 0.0 <= lo <= hi <= 1.0:
        raise SamplingError(f"guidance interval must satisfy 0 <= low <= high <= 1, got ({lo}, {hi}) "
                            "(--guidance-low/--guidance-high)")
    if channels == "auto":
        channels = DEFAULT_CFG_CHANNELS.get(getattr(model, "time_convention", "repa"), "all")
        channels = channels if channels == "all" else min(channels, in_channels)
    k = in_channels if channels == "all" else channels
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= in_channels:
        raise SamplingError(f"cfg channels must be 'auto', 'all' or an int in 1..{in_channels}, got {channels!r}")
    scale = float(cfg_scale)
    return Guidance(scale, (lo, hi), k, null_class(model) if scale != 1.0 else int(model.num_classes))


def guided_output(model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, guidance: Guidance,
                  active: bool) -> torch.Tensor:
    """One network evaluation, guided when ``active``.

    x: (B, C, H, W) model input (already in the model's dtype); t: (B,) model time; y: (B,) labels.
    Returns the raw output (B, C', H, W) as float64 (C' = C, or 2C for learned-variance DiT models).
    """
    if not active:
        return _call(model, x, t, y)
    null = torch.full_like(y, guidance.null)
    out = _call(model, torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
    cond, uncond = out.chunk(2)
    return guide(cond, uncond, guidance.scale, guidance.channels)


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float, channels: int | None = None) -> torch.Tensor:
    """``uncond + scale (cond - uncond)`` on the first ``channels`` of dim 1 (all: None); the rest is ``cond``."""
    k = cond.shape[1] if channels is None else channels
    guided = uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k])
    return torch.cat([guided, cond[:, k:]], dim=1) if k < cond.shape[1] else guided


def _call(model, x, t, y) -> torch.Tensor:
    out = model(x, t, y)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return out.to(torch.float64)
