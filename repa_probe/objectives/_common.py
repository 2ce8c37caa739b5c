"""Shared pieces of the training objectives: the error class, the abstract interface and shape helpers."""

from __future__ import annotations

import abc
import numbers

import torch

from repa_probe.errors import ReproError


class ObjectiveError(ReproError, ValueError):
    """Bad input to an objective (wrong shape, dtype, range or option); the message says what to fix."""


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: `x: (B, ...)` -> `(B,)` (DiT/ADM's `mean_flat`)."""
    if x.ndim < 2:
        raise ObjectiveError(f"mean_flat needs a (B, ...) tensor with at least 2 dims, got shape {tuple(x.shape)}")
    return x.mean(dim=tuple(range(1, x.ndim)))


def expand_time(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape per-sample `t: (B,)` to `(B, 1, ..., 1)` so that it broadcasts against `x: (B, ...)`."""
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ObjectiveError(
            f"t must have shape (B,) = ({x.shape[0]},) matching the batch of x {tuple(x.shape)}, got {tuple(t.shape)}"
        )
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def check_same_shape(**tensors: torch.Tensor) -> None:
    """Raise `ObjectiveError` unless every named tensor has the same shape."""
    shapes = {name: tuple(v.shape) for name, v in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{k}={s}" for k, s in shapes.items())
        raise ObjectiveError(f"shape mismatch: {listed} (all must be equal)")


class Objective(abc.ABC):
    """Interface shared by `FlowMatching` and `GaussianDiffusion` (see docs/design.md).

    Attributes:
        time_convention: the process time of `add_noise`: "repa" (float t, t=0 data, t=1 noise) or "ddpm"
            (integer step, larger = noisier); see `repa_probe.timesteps`.
    """

    time_convention: str

    @abc.abstractmethod
    def sample_t(self, batch: int, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
        """Draw training times `t: (B,)`."""

    @abc.abstractmethod
    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Corrupt `x0: (B, C, H, W)` to `x_t` (same shape) with `noise` of the same shape at times `t: (B,)`."""

    @abc.abstractmethod
    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """What the network's time embedder receives for times `t: (B,)`."""

    @abc.abstractmethod
    def loss(self, model_out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, noise: torch.Tensor,
             t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample loss terms: dict with `loss: (B,)` plus named terms `(B,)`, float32."""


def check_sample_args(batch: int, generator: torch.Generator | None, device: torch.device | str) -> torch.device:
    """Validate `sample_t` arguments; returns `device` as a `torch.device`."""
    if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 1:
        raise ObjectiveError(f"batch must be a positive int, got {batch!r}")
    device = torch.device(device)
    if generator is not None and generator.device.type != device.type:
        raise ObjectiveError(
            f"generator is on {generator.device} but times are requested on {device}: "
            "create the generator on the same device"
        )
    return device
