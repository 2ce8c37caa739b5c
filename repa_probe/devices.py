"""Where to run: the one reading of ``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` for every command."""
from __future__ import annotations

import torch

from repa_probe.errors import ReproError


class DeviceError(ReproError, ValueError):
    """A device that is not a device, or not on this machine (one-line message naming the option)."""


def resolve_device(device: str | torch.device | None = "auto", option: str = "--device") -> torch.device:
    """``auto`` / None -> ``cuda`` when available, else ``cpu``; ``cuda`` means the current CUDA device.

    A string torch cannot read, or a CUDA device that this machine lacks, is a :class:`DeviceError` that
    names ``option`` (``--device``, ``train.device``...).
    """
    eq = " " if option.startswith("-") else "="  # --device cpu, but train.device=cpu
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"{option}{eq}{device!r} is not a device (auto, cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{option}{eq}{device}: CUDA is not available on this machine; use {option}{eq}cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"{option}{eq}{device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev
