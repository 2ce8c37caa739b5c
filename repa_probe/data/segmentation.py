"""Segmentation datasets for the probes, read from local folders: Pascal VOC 2012 and ADE20K.

Both return the project's sample dict: ``image`` uint8 ``(3, R, R)``, ``label`` int64 (always 0: these
images have no image-level class; feature extraction feeds the model its null class), and ``mask`` int64
``(R, R)`` with class indices ``0..num_classes-1`` and ``ignore_index`` (255) for unlabelled pixels.

Image and mask go through the same geometry (:func:`crop_image_and_mask`): the short side is resized to
R (image bicubic, mask nearest so no new class values appear), then the central R x R square is kept.
An image whose mask has a different size raises :class:`DatasetError`.

Layouts:

- VOC 2012 (``root`` = ``VOC2012`` or the ``VOCdevkit`` folder above it): ``JPEGImages/<id>.jpg``,
  ``SegmentationClass/<id>.png`` (palette PNG: index = class, 0 = background, 255 = boundary / ignore),
  ``ImageSets/Segmentation/{train,val}.txt``. 21 classes.
- ADE20K SceneParsing (``root`` = ``ADEChallengeData2016``): ``images/{training,validation}/*.jpg`` and
  ``annotations/{training,validation}/*.png`` (same stem). Annotation 0 ("other") becomes 255 (ignored)
  and classes 1..150 become 0..149 (the mmseg ``reduce_zero_label`` convention). 150 classes.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from repa_probe.data.common import DatasetError

IGNORE_INDEX = 255
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


def crop_image_and_mask(image: Image.Image, mask: Image.Image, resolution: int,
                        where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Resize the short side to ``resolution`` and centre-crop a square, identically for both.

    Returns ``(R, R, 3)`` uint8 RGB and ``(R, R)`` int64 mask values (palette indices for "P" images).
    """
    if image.size != mask.size:
        raise DatasetError(f"{where}: image is {image.size[0]}x{image.size[1]} but its mask is "
                           f"{mask.size[0]}x{mask.size[1]}")
    if resolution < 1:
        raise DatasetError(f"resolution must be >= 1, got {resolution}")
    w, h = image.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    image = image.convert("RGB")
    if mask.mode not in ("P", "L", "I", "I;16"):
        raise DatasetError(f"{where}: mask mode {mask.mode!r} is not a single-channel label image (P or L)")
    if size != image.size:
        image = image.resize(size, resample=Image.Resampling.BICUBIC)
        mask = mask.resize(size, resample=Image.Resampling.NEAREST)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    box = (left, top, left + resolution, top + resolution)
    return np.asarray(image.crop(box)), np.asarray(mask.crop(box)).astype(np.int64)


class _SegmentationFolder(Dataset):
    """Shared loading for paired (image, mask) files; subclasses set ``pairs`` and ``_map_mask``."""

    num_classes: int
    ignore_index = IGNORE_INDEX
    class_names: list

    def __init__(self, root: str, split: str, resolution: int, pairs: list[tuple[str, str]]):
        if not pairs:
            raise DatasetError(f"{type(self).__name__}: no {split} images under {root}")
        self.root, self.split, self.resolution = str(root), split, int(resolution)
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def _map_mask(self, m: np.ndarray) -> np.ndarray:
        return m

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        img_path, mask_path = self.pairs[idx]
        try:
            with Image.open(img_path) as im, Image.open(mask_path) as mk:
                img, mask = crop_image_and_mask(im, mk, self.resolution, where=img_path)
        except OSError as exc:
            raise DatasetError(f"cannot read {img_path} / {mask_path}: {exc}") from None
        return {"image": torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))),
                "label": torch.tensor(0, dtype=torch.int64),
                "mask": torch.from_numpy(self._map_mask(mask))}


class VOCSegmentation(_SegmentationFolder):
    """Pascal VOC 2012 segmentation (``split`` "train" or "val"; 21 classes, 255 ignored)."""

    num_classes = 21
    class_names = list(VOC_CLASSES)

    def __init__(self, root: str, split: str = "train", resolution: int = 256):
        if split not in ("train", "val", "trainval"):
            raise DatasetError(f"VOC split must be train, val or trainval, got {split!r}")
        base = Path(root)
        if (base / "VOC2012").is_dir():
            base = base / "VOC2012"
        if not (base / "JPEGImages").is_dir():
            raise DatasetError(f"{root}: not a VOC 2012 folder (expected JPEGImages/, SegmentationClass/, ImageSets/)")
        listing = base / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not listing.is_file():
            raise DatasetError(f"{root}: missing {listing.relative_to(base)}")
        ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        pairs = [(str(base / "JPEGImages" / f"{i}.jpg"), str(base / "SegmentationClass" / f"{i}.png")) for i in ids]
        missing = next((p for pair in pairs for p in pair if not os.path.isfile(p)), None)
        if missing is not None:
            raise DatasetError(f"{listing.name} lists a sample whose file is missing: {missing}")
        super().__init__(str(base), split, resolution, pairs)


class ADE20KSegmentation(_SegmentationFolder):
    """ADE20K SceneParsing (``split`` "train"/"training" or "val"/"validation"; 150 classes, 0 → 255)."""

    num_classes = 150
    class_names = [f"class{i}" for i in range(150)]

    def __init__(self, root: str, split: str = "train", resolution: int = 512):
        folder = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}
        if split not in folder:
            raise DatasetError(f"ADE20K split must be train or val, got {split!r}")
        base = Path(root)
        img_dir, ann_dir = base / "images" / folder[split], base / "annotations" / folder[split]
        if not img_dir.is_dir() or not ann_dir.is_dir():
            raise DatasetError(f"{root}: not an ADE20K folder (expected images/{folder[split]}/ and "
                               f"annotations/{folder[split]}/)")
        images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        pairs = [(str(p), str(ann_dir / f"{p.stem}.png")) for p in images]
        missing = next((m for _, m in pairs if not os.path.isfile(m)), None)
        if missing is not None:
            raise DatasetError(f"ADE20K image without annotation: {missing} does not exist")
        super().__init__(str(base), split, resolution, pairs)

    def _map_mask(self, m: np.ndarray) -> np.ndarray:
        out = m - 1
        out[m == 0] = IGNORE_INDEX
        return out
