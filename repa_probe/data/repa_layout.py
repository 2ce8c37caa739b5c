"""``REPAFeatureDataset``: REPA's preprocessed ImageNet layout, read as is.

Layout written by REPA's ``preprocessing/dataset_tools.py`` (``convert`` then ``encode``)::

    data_dir/images/dataset.json              {"labels": [["00000/img00000000.png", 6], ...]}
    data_dir/images/00000/img00000000.png     uint8 RGB, centre-cropped to R x R
    data_dir/vae-sd/dataset.json              {"labels": [["00000/img-mean-std-00000000.npy", 6], ...]}
    data_dir/vae-sd/00000/img-mean-std-00000000.npy   float32 (2C, h, w) = posterior mean ‖ std

As in REPA's ``CustomDataset``, both file lists are sorted and paired by position, and labels come
from ``vae-sd/dataset.json`` keyed by the feature file name. Stricter than REPA: the two counts must
match (checked at construction), the 8-digit indices in paired names must agree, and the image
resolution is checked against ``resolution`` when given.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from repa_probe.data.common import DatasetError
from repa_probe.data.imagefolder import IMAGE_EXTENSIONS

_INDEX_RE = re.compile(r"(\d+)\.[A-Za-z0-9]+$")


def list_files(folder: str, extensions: tuple[str, ...]) -> list[str]:
    """Sorted '/'-separated paths relative to ``folder`` of files ending in ``extensions``."""
    out = []
    for dirpath, _dirs, files in os.walk(folder, followlinks=True):
        for f in files:
            if f.lower().endswith(extensions):
                out.append(os.path.relpath(os.path.join(dirpath, f), folder).replace(os.sep, "/"))
    return sorted(out)


def read_labels_json(path: str) -> dict[str, int]:
    """``{"labels": [[fname, label], ...]}`` → ``{fname: label}``; integer labels only."""
    if not os.path.isfile(path):
        raise DatasetError(f"missing label file {path}")
    try:
        with open(path, "rb") as f:
            entries = json.load(f).get("labels")
    except (OSError, ValueError, AttributeError) as e:
        raise DatasetError(f"{path}: not a valid dataset.json ({e})") from e
    if entries is None:
        raise DatasetError(f"{path}: 'labels' is null (unlabelled dataset); class labels are required")
    out = {}
    for entry in entries:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], int)):
            raise DatasetError(f"{path}: each label entry must be [fname, int], got {entry!r}")
        out[str(entry[0]).replace("\\", "/")] = entry[1]
    return out


class REPAFeatureDataset(Dataset):
    """Returns ``image`` uint8 (3, R, R), ``moments`` float32 (2C, h, w) (8x32x32 for SD-VAE at 256),
    ``label`` int64.

    Args:
        data_dir: folder holding ``images/`` and ``vae-sd/``.
        resolution: expected image side R; None = take it from the first image. A different image
            size raises :class:`DatasetError`.
        num_classes: None = ``max(label) + 1`` (pass 1000 for an ImageNet subset).
        features_subdir: name of the latent folder (REPA: ``vae-sd``).
    """

    def __init__(self, data_dir: str, resolution: int | None = None, num_classes: int | None = None,
                 features_subdir: str = "vae-sd"):
        self.data_dir = data_dir
        self.images_dir = os.path.join(data_dir, "images")
        self.features_dir = os.path.join(data_dir, features_subdir)
        for d in (self.images_dir, self.features_dir):
            if not os.path.isdir(d):
                raise DatasetError(f"REPAFeatureDataset: missing folder {d} (expected {data_dir}/images and "
                                   f"{data_dir}/{features_subdir})")
        self.image_fnames = list_files(self.images_dir, IMAGE_EXTENSIONS + (".npy",))
        self.feature_fnames = list_files(self.features_dir, (".npy",))
        n_img, n_feat = len(self.image_fnames), len(self.feature_fnames)
        if n_img != n_feat:
            raise DatasetError(f"REPAFeatureDataset: {n_img} image files in {self.images_dir} but {n_feat} "
                               f".npy feature files in {self.features_dir}; counts must match")
        if n_img == 0:
            raise DatasetError(f"REPAFeatureDataset: no images in {self.images_dir}")
        for a, b in zip(self.image_fnames, self.feature_fnames):
            ma, mb = _INDEX_RE.search(a), _INDEX_RE.search(b)
            if ma and mb and int(ma.group(1)) != int(mb.group(1)):
                raise DatasetError(f"REPAFeatureDataset: sorted files do not pair up: {a} vs {b}")
        table = read_labels_json(os.path.join(self.features_dir, "dataset.json"))
        missing = [f for f in self.feature_fnames if f not in table]
        if missing:
            raise DatasetError(f"REPAFeatureDataset: {len(missing)} feature files have no label in "
                               f"{self.features_dir}/dataset.json, e.g. {missing[0]}")
        self.labels = torch.tensor([table[f] for f in self.feature_fnames], dtype=torch.int64)
        if int(self.labels.min()) < 0:
            raise DatasetError("REPAFeatureDataset: negative labels in dataset.json")
        inferred = int(self.labels.max()) + 1
        if num_classes is not None and num_classes < inferred:
            raise DatasetError(f"REPAFeatureDataset: num_classes={num_classes} but labels go up to {inferred - 1}")
        self.num_classes = int(num_classes) if num_classes is not None else inferred

        first = self._read_image(0)
        self.resolution = int(resolution) if resolution is not None else first.shape[-1]
        self._check_image(first, 0)
        self.moments_shape = tuple(self._read_moments(0).shape)
        if len(self.moments_shape) != 3 or self.moments_shape[0] % 2:
            raise DatasetError(f"REPAFeatureDataset: {self.feature_fnames[0]} has shape {self.moments_shape}; "
                               "expected (2C, h, w) mean ‖ std")

    def __len__(self) -> int:
        return len(self.feature_fnames)

    def _read_image(self, idx: int) -> np.ndarray:
        """(3, H, W) uint8."""
        path = os.path.join(self.images_dir, self.image_fnames[idx])
        if path.lower().endswith(".npy"):
            arr = np.load(path)
            return arr.reshape(-1, *arr.shape[-2:])
        with Image.open(path) as im:
            if im.mode != "RGB":
                im = im.convert("RGB")
            return np.asarray(im).transpose(2, 0, 1)

    def _check_image(self, img: np.ndarray, idx: int) -> None:
        r = self.resolution
        if img.shape != (3, r, r) or img.dtype != np.uint8:
            raise DatasetError(f"REPAFeatureDataset: {self.image_fnames[idx]} is {img.shape} {img.dtype}, "
                               f"expected (3, {r}, {r}) uint8")

    def _read_moments(self, idx: int) -> np.ndarray:
        return np.load(os.path.join(self.features_dir, self.feature_fnames[idx]))

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        img = self._read_image(idx)
        self._check_image(img, idx)
        mom = self._read_moments(idx)
        if mom.shape != self.moments_shape:
            raise DatasetError(f"REPAFeatureDataset: {self.feature_fnames[idx]} has shape {mom.shape}, "
                               f"expected {self.moments_shape}")
        return {"image": torch.from_numpy(np.ascontiguousarray(img)),
                "moments": torch.from_numpy(mom.astype(np.float32, copy=False)),
                "label": self.labels[idx].clone()}
