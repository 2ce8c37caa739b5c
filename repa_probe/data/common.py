"""Shared pieces of the data package: the error type, split names, ``collate``, a capped view and the
resumable horizontal flip.

Every dataset in :mod:`repa_probe.data` returns one dict per sample::

    {"image": uint8 (3, H, W), "label": int64 scalar,
     "moments": float32 (2C, h, w)  # optional, VAE posterior mean ‖ std
     "mask": int64 (H, W)}          # optional, per-pixel segmentation

and exposes ``num_classes``, ``resolution`` and ``__len__`` (``class_names`` where known).
"""
from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from repa_probe.errors import ReproError

SPLITS = ("train", "val", "test")
FLIP_KEYS = ("image", "moments", "mask")  # the spatial entries of a sample, flipped together along W


class DatasetError(ReproError, ValueError):
    """Bad dataset input: missing or empty folder, mismatched files, wrong resolution, unknown name."""


def check_split(split: str, allowed: Sequence[str] = SPLITS) -> str:
    """Return ``split`` if it is one of ``allowed``, else raise :class:`DatasetError`."""
    if split not in allowed:
        raise DatasetError(f"unknown split {split!r}; valid splits: {', '.join(allowed)}")
    return split


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of sample dicts into a batch dict.

    Tensors of shape ``S`` become ``(B, *S)`` (scalars become ``(B,)``); other values become lists.
    All samples must have the same keys and, per key, the same tensor shape and dtype.
    """
    if not samples:
        raise DatasetError("collate got an empty list of samples")
    keys = list(samples[0].keys())
    out: dict[str, Any] = {}
    for i, s in enumerate(samples):
        if list(s.keys()) != keys:
            raise DatasetError(f"collate: sample {i} has keys {sorted(s)}, sample 0 has {sorted(keys)}")
    for k in keys:
        vals = [s[k] for s in samples]
        if isinstance(vals[0], torch.Tensor):
            first = vals[0]
            for i, v in enumerate(vals):
                if v.shape != first.shape or v.dtype != first.dtype:
                    raise DatasetError(
                        f"collate: key {k!r} sample {i} is {tuple(v.shape)} {v.dtype}, "
                        f"sample 0 is {tuple(first.shape)} {first.dtype}")
            out[k] = torch.stack(vals, 0)
        else:
            out[k] = vals
    return out


class CappedDataset(Dataset):
    """A deterministic subset of ``base``: ``num_samples`` evenly spaced indices (all classes kept
    for class-sorted datasets such as ImageFolder). Attributes (``num_classes``, ``resolution``,
    ``class_names``, ...) are forwarded to ``base``."""

    def __init__(self, base: Dataset, num_samples: int):
        n = len(base)  # type: ignore[arg-type]
        if not 0 < num_samples <= n:
            raise DatasetError(f"num_samples={num_samples} must be in [1, {n}] for this dataset")
        self.base = base
        self.indices = np.unique(np.linspace(0, n - 1, num_samples).round().astype(np.int64))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return self.base[int(self.indices[idx])]

    def __getattr__(self, name: str) -> Any:
        if name in ("base", "indices") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.base, name)


def flip_coin(seed: int, epoch: int, index: int) -> bool:
    """Whether sample ``index`` is flipped in ``epoch``: one bit of a hash (BLAKE2b) of (seed, epoch, index).

    Counter-based: no RNG state, the same answer in any process, worker or resumed run; about half the
    samples are flipped, independently per epoch.
    """
    digest = hashlib.blake2b(f"hflip/{int(seed)}/{int(epoch)}/{int(index)}".encode(), digest_size=8).digest()
    return bool(digest[0] & 1)


class EpochFlipDataset(Dataset):
    """``ds[(epoch, index)]`` is ``base[index]`` with its :data:`FLIP_KEYS` entries flipped along the last
    (width) axis when :func:`flip_coin` says so.

    The REPA layout's ``moments`` (VAE posterior of the unflipped image) are flipped with the image: the
    latent of a flipped image is taken to be the flipped latent, an approximation (the SD-VAE is not exactly
    flip-equivariant); ``python -m train.extract_latents --flip`` stores exactly encoded flipped copies instead.
    """

    def __init__(self, base: Dataset, seed: int):
        self.base, self.seed = base, int(seed)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        sample = self.base[index]
        if not flip_coin(self.seed, epoch, index):
            return sample
        return {k: (v.flip(-1) if k in FLIP_KEYS and isinstance(v, torch.Tensor) else v) for k, v in sample.items()}
