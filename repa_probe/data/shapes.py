"""``ShapesDataset``: procedural coloured shapes on textured backgrounds, with segmentation masks.

No download, no files. Each sample is rendered from its own generator
``np.random.default_rng([seed, split_id, index])``, so a sample depends only on (seed, split, index):
it is identical across runs, processes and ``num_samples``, and the three splits draw from
independent streams (they never share samples).

A sample is one shape (the class is the shape type) with a random position, size, small rotation
(within ±20°, so a square never becomes a diamond), random colour and a shading gradient, drawn
over a background that blends smooth colour noise with random stripes, plus per-pixel Gaussian
noise. Colour carries no class information, so the class must be read from the silhouette.

``mask`` (H, W) int64: 0 = background, ``1 + label`` = pixels of the shape, hence
``num_mask_classes = num_classes + 1`` values in total.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from repa_probe.data.common import SPLITS, DatasetError, check_split

_SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}
_NOISE_GRID = 4  # the smooth background noise is a bilinear upsampling of a 4x4 random colour grid


def _square(u, v):
    return np.maximum(np.abs(u), np.abs(v)) <= 0.75


def _circle(u, v):
    return u * u + v * v <= 0.85 ** 2


def _triangle(u, v):  # apex up (v grows downwards in image coordinates)
    return (v <= 0.55) & (np.abs(u) <= (v + 0.95) / np.sqrt(3.0))


def _cross(u, v):
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.28) & (av <= 0.9)) | ((av <= 0.28) & (au <= 0.9))


def _diamond(u, v):
    return np.abs(u) + np.abs(v) <= 0.95


def _ring(u, v):
    r2 = u * u + v * v
    return (r2 <= 0.92 ** 2) & (r2 >= 0.5 ** 2)


def _star(u, v):
    r = np.sqrt(u * u + v * v)
    return r <= 0.55 + 0.35 * np.cos(5.0 * np.arctan2(u, -v))


def _crescent(u, v):
    return (u * u + v * v <= 0.9 ** 2) & ((u - 0.45) ** 2 + v * v >= 0.7 ** 2)


SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "square": _square, "circle": _circle, "triangle": _triangle, "cross": _cross,
    "diamond": _diamond, "ring": _ring, "star": _star, "crescent": _crescent,
}
SHAPE_NAMES = tuple(SHAPES)


def _noise_upsample_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) bilinear interpolation weights from n_in grid nodes spanning [0, 1]."""
    pos = (np.arange(n_out) + 0.5) / n_out * (n_in - 1)
    lo = np.clip(np.floor(pos).astype(np.int64), 0, n_in - 2)
    frac = pos - lo
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] = 1.0 - frac
    m[np.arange(n_out), lo + 1] = frac
    return m


class ShapesDataset(Dataset):
    """Procedural shapes: ``image`` uint8 (3, R, R), ``label`` int64, ``mask`` int64 (R, R).

    Args:
        num_samples: dataset length.
        resolution: image side R (>= 8).
        num_classes: number of shape types, 2..8, taken in the order of ``SHAPE_NAMES``
            (square, circle, triangle, cross, diamond, ring, star, crescent).
        seed: base seed; together with ``split`` and the index it fixes every sample.
        split: "train", "val" or "test" (independent random streams).

    Labels are balanced: ``label = index % num_classes``.
    """

    def __init__(self, num_samples: int, resolution: int = 32, num_classes: int = 4, seed: int = 0,
                 split: str = "train"):
        if num_samples < 1:
            raise DatasetError(f"ShapesDataset: num_samples must be >= 1, got {num_samples}")
        if resolution < 8:
            raise DatasetError(f"ShapesDataset: resolution must be >= 8, got {resolution}")
        if not 2 <= num_classes <= len(SHAPES):
            raise DatasetError(f"ShapesDataset: num_classes must be in [2, {len(SHAPES)}], got {num_classes}")
        self.num_samples = int(num_samples)
        self.resolution = int(resolution)
        self.num_classes = int(num_classes)
        self.num_mask_classes = self.num_classes + 1
        self.class_names = list(SHAPE_NAMES[: self.num_classes])
        self.seed = int(seed)
        self.split = check_split(split)
        self._interp = _noise_upsample_matrix(self.resolution, _NOISE_GRID)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([idx])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        """``[self[i] for i in indices]``, rendered as one vectorised batch (a DataLoader calls this with the
        indices of a whole batch: ~10x faster than one sample at a time)."""
        for i in indices:
            if not -self.num_samples <= i < self.num_samples:
                raise IndexError(f"index {i} out of range for ShapesDataset of length {self.num_samples}")
        b = self.render([int(i) % self.num_samples for i in indices])
        return [{"image": im, "label": lb, "mask": m} for im, lb, m in zip(b["image"], b["label"], b["mask"])]

    # ------------------------------------------------------------------ rendering
    def _params(self, idx: int) -> dict[str, np.ndarray]:
        """All random draws of one sample, from its own generator (fixed draw order)."""
        rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], int(idx)])
        r = self.resolution
        scale = rng.uniform(0.2, 0.34)
        return {
            "scale": scale,
            "center": rng.uniform(scale * 0.95, 1.0 - scale * 0.95, size=2),  # (x, y) in [0, 1]
            "angle": rng.uniform(-np.pi / 9, np.pi / 9),
            "colour": rng.uniform(0.0, 1.0, size=3),
            "shade": rng.uniform(-0.15, 0.15, size=2),
            "noise_grid": rng.uniform(0.0, 1.0, size=(3, _NOISE_GRID, _NOISE_GRID)),
            "stripe_colours": rng.uniform(0.0, 1.0, size=(2, 3)),
            "stripe_freq": rng.uniform(1.5, 5.0),
            "stripe_angle": rng.uniform(0.0, np.pi),
            "stripe_phase": rng.uniform(0.0, 2 * np.pi),
            "mix": rng.uniform(0.0, 1.0),
            "pixel_noise": rng.normal(0.0, 0.03, size=(3, r, r)),
        }

    def render(self, indices: Sequence[int], chunk: int = 256) -> dict[str, torch.Tensor]:
        """Render a batch, vectorised over samples and pixels (in chunks of ``chunk`` samples).

        Returns ``image`` uint8 (N, 3, R, R), ``label`` int64 (N,), ``mask`` int64 (N, R, R).
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_samples):
            raise IndexError(f"indices must be in [0, {self.num_samples}) for this ShapesDataset")
        if idx.size > chunk:
            parts = [self._render(idx[i:i + chunk]) for i in range(0, idx.size, chunk)]
            return {k: torch.cat([q[k] for q in parts]) for k in parts[0]}
        return self._render(idx)

    def _render(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        plist = [self._params(i) for i in idx]
        p = {k: np.stack([q[k] for q in plist]) for k in plist[0]} if plist else {}
        n, r = idx.size, self.resolution
        labels = idx % self.num_classes
        if n == 0:
            return {"image": torch.zeros(0, 3, r, r, dtype=torch.uint8),
                    "label": torch.zeros(0, dtype=torch.int64), "mask": torch.zeros(0, r, r, dtype=torch.int64)}

        coord = (np.arange(r) + 0.5) / r                                   # (R,)
        dx = coord[None, None, :] - p["center"][:, 0, None, None]          # (N, 1, R)
        dy = coord[None, :, None] - p["center"][:, 1, None, None]          # (N, R, 1)
        cos, sin = np.cos(p["angle"])[:, None, None], np.sin(p["angle"])[:, None, None]
        s = p["scale"][:, None, None]
        u = (cos * dx + sin * dy) / s                                       # (N, R, R) shape frame
        v = (-sin * dx + cos * dy) / s
        inside = np.zeros((n, r, r), dtype=bool)
        for k in np.unique(labels):
            sel = labels == k
            inside[sel] = SHAPES[SHAPE_NAMES[k]](u[sel], v[sel])

        # background: smooth colour noise blended with stripes, (N, 3, R, R)
        noise_bg = self._interp @ p["noise_grid"] @ self._interp.T
        sa = p["stripe_angle"][:, None, None]
        phase = 2 * np.pi * p["stripe_freq"][:, None, None] * (np.cos(sa) * coord[None, None, :]
                                                               + np.sin(sa) * coord[None, :, None])
        t = 0.5 + 0.5 * np.sin(phase + p["stripe_phase"][:, None, None])    # (N, R, R)
        c0, c1 = p["stripe_colours"][:, 0, :, None, None], p["stripe_colours"][:, 1, :, None, None]
        stripes = c0 * t[:, None] + c1 * (1.0 - t[:, None])
        mix = p["mix"][:, None, None, None]
        bg = mix * noise_bg + (1.0 - mix) * stripes

        # shape colour: of c and 1 - c, take the one farther from the mean background colour
        colour = p["colour"]
        bg_mean = bg.mean(axis=(2, 3))
        flip = np.linalg.norm(1.0 - colour - bg_mean, axis=1) > np.linalg.norm(colour - bg_mean, axis=1)
        colour = np.where(flip[:, None], 1.0 - colour, colour)
        shading = 1.0 + p["shade"][:, 0, None, None] * u + p["shade"][:, 1, None, None] * v
        fg = colour[:, :, None, None] * shading[:, None]

        img = np.where(inside[:, None], fg, bg) + p["pixel_noise"]
        img = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
        mask = np.where(inside, labels[:, None, None] + 1, 0).astype(np.int64)
        return {"image": torch.from_numpy(img), "label": torch.from_numpy(labels.astype(np.int64)),
                "mask": torch.from_numpy(mask)}
