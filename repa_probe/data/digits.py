"""``DigitsDataset``: scikit-learn's 8x8 handwritten digits (ships with sklearn, no download)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from repa_probe.data.common import DatasetError, check_split


class DigitsDataset(Dataset):
    """sklearn ``load_digits`` (1797 images, 8x8, ink values 0..16, white digit on black).

    Split: a fixed stratified 80/20 train/test split drawn with ``seed`` (``"val"`` is an alias of
    ``"test"``: there are only two disjoint parts). Each 8x8 image is scaled to 0..255, upsampled to
    ``resolution`` with bilinear interpolation (half-pixel centres) and repeated to 3 channels.

    Returns ``image`` uint8 (3, R, R) and ``label`` int64 in 0..9. ``num_classes`` = 10.
    """

    test_fraction = 0.2

    def __init__(self, split: str = "train", resolution: int = 32, seed: int = 0):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        check_split(split)
        if resolution < 8:
            raise DatasetError(f"DigitsDataset: resolution must be >= 8, got {resolution}")
        self.split = split
        self.resolution = int(resolution)
        self.seed = int(seed)
        self.num_classes = 10
        self.class_names = [str(i) for i in range(10)]
        data = load_digits()
        images = np.asarray(data.images, dtype=np.float32)  # (1797, 8, 8), 0..16
        labels = np.asarray(data.target, dtype=np.int64)
        all_idx = np.arange(len(labels))
        train_idx, test_idx = train_test_split(all_idx, test_size=self.test_fraction, random_state=self.seed,
                                               stratify=labels)
        self.indices = np.sort(train_idx if split == "train" else test_idx)  # positions in load_digits
        self._images = torch.from_numpy(images[self.indices] * (255.0 / 16.0))  # (N, 8, 8) float32
        self.labels = torch.from_numpy(labels[self.indices])                    # (N,) int64

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        x = self._images[idx][None, None]  # (1, 1, 8, 8)
        if self.resolution != 8:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        img = x[0].round().clamp(0, 255).to(torch.uint8).expand(3, -1, -1).contiguous()  # (3, R, R)
        return {"image": img, "label": self.labels[idx].clone()}
