"""Datasets, sampler and loaders. Every dataset returns dicts::

    image uint8 (3, H, W) | label int64 () | moments float32 (2C, h, w) (optional) | mask int64 (H, W) (optional)

and exposes ``num_classes``, ``resolution``, ``__len__`` (and ``class_names`` where known).
See :mod:`repa_probe.data.sampler` for the resume protocol.
"""
from repa_probe.data.build import DATASET_NAMES, build_dataset
from repa_probe.data.common import CappedDataset, DatasetError, EpochFlipDataset, collate, flip_coin
from repa_probe.data.digits import DigitsDataset
from repa_probe.data.imagefolder import ImageFolderDataset, center_crop_arr
from repa_probe.data.repa_layout import REPAFeatureDataset
from repa_probe.data.sampler import LoaderOptions, ResumableSampler, infinite_loader
from repa_probe.data.shapes import SHAPE_NAMES, ShapesDataset

__all__ = [
    "DATASET_NAMES", "build_dataset", "CappedDataset", "DatasetError", "collate", "DigitsDataset",
    "ImageFolderDataset", "center_crop_arr", "REPAFeatureDataset", "ResumableSampler", "LoaderOptions", "infinite_loader",
    "SHAPE_NAMES", "ShapesDataset", "EpochFlipDataset", "flip_coin",
]
