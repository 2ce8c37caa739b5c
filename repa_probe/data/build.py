"""``build_dataset``: one entry point from a name (or a ``cfg.data`` mapping) to a dataset."""
from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from typing import Any, Callable

from torch.utils.data import Dataset

from repa_probe.data.common import CappedDataset, DatasetError, check_split
from repa_probe.data.digits import DigitsDataset
from repa_probe.data.imagefolder import ImageFolderDataset
from repa_probe.data.repa_layout import REPAFeatureDataset
from repa_probe.data.shapes import ShapesDataset

DATASET_NAMES = ("shapes", "digits", "imagefolder", "repa")
# keys of a data config that belong to the loader, ignored here when a mapping is passed
LOADER_KEYS = frozenset({"batch_size", "num_workers", "pin_memory", "prefetch_factor", "persistent_workers",
                         "drop_last", "shuffle"})
DEFAULT_SHAPES_SAMPLES = {"train": 10000, "val": 1000, "test": 1000}


def _split_dir(root: str | None, split: str, name: str, looks_right: Callable[[str], bool]) -> str:
    """``root/<split>`` if it is a dataset folder, else ``root`` itself (train split only)."""
    if root is None:
        raise DatasetError(f"build_dataset({name!r}) needs root=")
    if not os.path.isdir(root):
        raise DatasetError(f"build_dataset({name!r}): root {root} is not a directory")
    sub = os.path.join(root, split)
    if os.path.isdir(sub) and looks_right(sub):
        return sub
    if split == "train" and looks_right(root):
        return root
    raise DatasetError(f"build_dataset({name!r}): no {split!r} split: expected {sub}"
                       + (" or a dataset directly in root" if split == "train" else ""))


def _check_kwargs(cls: type, kwargs: dict[str, Any], used: set[str]) -> None:
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"} - used
    bad = sorted(set(kwargs) - allowed)
    if bad:
        raise DatasetError(f"build_dataset: {cls.__name__} does not take {bad}; extra options allowed: "
                           f"{sorted(allowed) or 'none'}")


def build_dataset(name: str | Mapping, root: str | None = None, split: str = "train",
                  resolution: int | None = None, num_samples: int | None = None, seed: int = 0,
                  **kwargs: Any) -> Dataset:
    """Build a dataset by name: ``shapes``, ``digits``, ``imagefolder`` or ``repa``.

    ``name`` may also be a mapping (e.g. ``cfg.data``) with a ``name`` key and any of the keywords
    below; loader keys (``batch_size``, ``num_workers``, ...) in it are ignored.

    - ``resolution``: None = the dataset's default (shapes/digits 32, imagefolder 256, repa from
      the files).
    - ``num_samples``: size of ``shapes`` (default 10000 train / 1000 val, test); for the other
      datasets, a cap: that many evenly spaced samples (keeps all classes of class-sorted data).
    - ``root``: for ``imagefolder`` and ``repa``: ``root/<split>`` is used when it exists,
      else ``root`` itself for the train split.
    - extra ``kwargs`` go to the dataset class (e.g. ``num_classes`` for shapes, ``strict`` for
      imagefolder); unknown ones raise :class:`DatasetError`. Datasets never augment: the training
      loader flips (``infinite_loader(flip=True)``).
    """
    if isinstance(name, Mapping) or hasattr(name, "items"):
        try:
            from omegaconf import DictConfig, OmegaConf
            cfg = OmegaConf.to_container(name, resolve=True) if isinstance(name, DictConfig) else dict(name)
        except ImportError:
            cfg = dict(name)
        cfg = {k: v for k, v in cfg.items() if k not in LOADER_KEYS}
        if "name" not in cfg:
            raise DatasetError(f"build_dataset: data config has no 'name' (one of {', '.join(DATASET_NAMES)})")
        merged = {"root": root, "split": split, "resolution": resolution, "num_samples": num_samples,
                  "seed": seed, **kwargs, **cfg}
        return build_dataset(**merged)
    if name not in DATASET_NAMES:
        raise DatasetError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    check_split(split)

    ds: Any
    if name == "shapes":
        _check_kwargs(ShapesDataset, kwargs, {"num_samples", "resolution", "seed", "split"})
        n = num_samples if num_samples is not None else DEFAULT_SHAPES_SAMPLES[split]
        return ShapesDataset(n, resolution=resolution or 32, seed=seed, split=split, **kwargs)
    if name == "digits":
        _check_kwargs(DigitsDataset, kwargs, {"split", "resolution", "seed"})
        ds = DigitsDataset(split=split, resolution=resolution or 32, seed=seed)
    elif name == "imagefolder":
        _check_kwargs(ImageFolderDataset, kwargs, {"root", "resolution"})
        folder = _split_dir(root, split, name, os.path.isdir)
        ds = ImageFolderDataset(folder, resolution=resolution or 256, **kwargs)
    else:  # repa
        _check_kwargs(REPAFeatureDataset, kwargs, {"data_dir", "resolution"})
        folder = _split_dir(root, split, name, lambda d: os.path.isdir(os.path.join(d, "images")))
        ds = REPAFeatureDataset(folder, resolution=resolution, **kwargs)
    if num_samples is not None and num_samples != len(ds):
        ds = CappedDataset(ds, num_samples)
    return ds
