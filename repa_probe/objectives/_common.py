"""Shared pieces of the training objectives: the error class, the abstract interface and shape helpers."""

from __future__ import annotations

import abc
import math
import numbers
from typing import Iterable

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


def as_value_list(values: Iterable | torch.Tensor | numbers.Real) -> list:
    """Turn the `values` given to `parse_timesteps` into a non-empty list of Python numbers.

    Accepts a list/tuple of numbers, a 1-D tensor or numpy array, or a single number. Booleans, strings and
    NaN are rejected with `ObjectiveError`.
    """
    if isinstance(values, torch.Tensor):
        values = values.reshape(-1).tolist()
    elif hasattr(values, "tolist") and not isinstance(values, (str, bytes)):  # numpy arrays and scalars
        values = values.tolist()
    if isinstance(values, numbers.Number) and not isinstance(values, bool):
        values = [values]
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ObjectiveError(f"timesteps must be a list of numbers, got {values!r}")
    out = list(values)
    if not out:
        raise ObjectiveError("timesteps list is empty: give at least one timestep")
    for v in out:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise ObjectiveError(f"timestep {v!r} is not a number (give ints or floats)")
        if isinstance(v, float) and math.isnan(v):
            raise ObjectiveError("timestep NaN is not allowed")
    return out


class Objective(abc.ABC):
    """Interface shared by `FlowMatching` and `GaussianDiffusion` (see docs/design.md).

    Attributes:
        time_convention: "repa" (float t, t=0 data, t=1 noise) or "ddpm" (integer step, larger = noisier).
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

    @abc.abstractmethod
    def parse_timesteps(self, values) -> torch.Tensor:
        """Turn user-given timesteps (e.g. for feature extraction) into a 1-D CPU tensor of times."""


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
