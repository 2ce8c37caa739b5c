"""``ImageFolderDataset`` (ImageNet layout ``root/<class>/*.JPEG``) and the ADM centre crop."""
from __future__ import annotations

import logging
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from repa_probe.data.common import DatasetError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff", ".gif")


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM / DiT / REPA centre crop (``center-crop-dhariwal``) of an RGB image to a square.

    1. while the short side is >= 2 * ``image_size``: halve both sides (floor) with a BOX filter;
    2. BICUBIC resize so the short side is ``image_size`` (long side ``round(long * scale)``);
    3. crop the central ``image_size`` square (offset ``(excess) // 2`` on each axis).

    Returns an (image_size, image_size, C) uint8 array.
    """
    if image_size < 1:
        raise DatasetError(f"center_crop_arr: image_size must be >= 1, got {image_size}")
    img = pil_image
    while min(img.size) >= 2 * image_size:
        w, h = img.size
        img = img.resize((w // 2, h // 2), resample=Image.Resampling.BOX)
    factor = image_size / min(img.size)
    target = (round(img.size[0] * factor), round(img.size[1] * factor))
    if target != img.size:
        img = img.resize(target, resample=Image.Resampling.BICUBIC)
    arr = np.asarray(img)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top: top + image_size, left: left + image_size].copy()  # writable


class ImageFolderDataset(Dataset):
    """Images under ``root/<class_name>/...`` (searched recursively), classes sorted by name.

    Returns ``image`` uint8 (3, R, R) after :func:`center_crop_arr` and ``label`` int64. No augmentation
    here: the training loader flips (``infinite_loader(flip=True)``, resumable).

    Args:
        root: folder whose sub-folders are the classes.
        resolution: output side R.
        strict: if True, an unreadable or corrupt image raises :class:`DatasetError`.
        extensions: accepted file suffixes (case-insensitive).

    Unreadable files (strict=False): a warning is logged once per file, the file is marked bad
    and the sample of the next index (cyclically) that loads is returned instead, so a given
    index always maps to the same image. ``skipped`` is the number of distinct bad files met so
    far, in all processes (the flags live in shared memory, so DataLoader workers report too).
    If every file is unreadable, :class:`DatasetError` is raised.
    """

    def __init__(self, root: str, resolution: int = 256, strict: bool = False,
                 extensions: tuple[str, ...] = IMAGE_EXTENSIONS):
        if not os.path.isdir(root):
            raise DatasetError(f"ImageFolderDataset: {root} is not a directory")
        if resolution < 1:
            raise DatasetError(f"ImageFolderDataset: resolution must be >= 1, got {resolution}")
        self.root = root
        self.resolution = int(resolution)
        self.strict = bool(strict)
        exts = tuple(e.lower() for e in extensions)
        self.class_names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if not self.class_names:
            raise DatasetError(f"ImageFolderDataset: no class sub-folders in {root} (expected root/<class>/*.JPEG)")
        self.class_to_idx = {c: i for i, c in enumerate(self.class_names)}
        self.num_classes = len(self.class_names)
        samples: list[tuple[str, int]] = []
        for c in self.class_names:
            found = []
            for dirpath, dirnames, filenames in os.walk(os.path.join(root, c), followlinks=True):
                dirnames.sort()
                found += [os.path.join(dirpath, f) for f in filenames if f.lower().endswith(exts)]
            samples += [(p, self.class_to_idx[c]) for p in sorted(found)]
        if not samples:
            raise DatasetError(f"ImageFolderDataset: no images with extensions {exts} under {root}")
        self.samples = samples
        self.labels = torch.tensor([y for _, y in samples], dtype=torch.int64)
        self._bad = torch.zeros(len(samples), dtype=torch.bool).share_memory_()

    @property
    def skipped(self) -> int:
        """Number of distinct unreadable files encountered so far (all processes)."""
        return int(self._bad.sum())

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, idx: int) -> np.ndarray:
        path = self.samples[idx][0]
        with Image.open(path) as im:
            return center_crop_arr(im.convert("RGB"), self.resolution)  # (R, R, 3)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        n = len(self.samples)
        if not -n <= idx < n:
            raise IndexError(f"index {idx} out of range for ImageFolderDataset of length {n}")
        idx %= n
        for k in range(n):
            j = (idx + k) % n
            if bool(self._bad[j]):  # known bad (files are assumed to stay bad)
                continue
            try:
                arr = self._load(j)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                if self.strict:
                    raise DatasetError(f"ImageFolderDataset: cannot read {self.samples[j][0]}: {e}") from e
                if not bool(self._bad[j]):
                    self._bad[j] = True
                    log.warning("skipping unreadable image %s (%s: %s)", self.samples[j][0], type(e).__name__, e)
                continue
            img = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()  # (3, R, R)
            return {"image": img, "label": self.labels[j].clone()}
        raise DatasetError(f"ImageFolderDataset: no readable image in {self.root}")
