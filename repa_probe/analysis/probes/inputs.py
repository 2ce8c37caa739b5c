"""What the probe runs are measured on: the train / test splits of a probe dataset, and their masks.

The dataset, VAE and encoder are resolved by the shared resolver (:mod:`repa_probe.analysis.core.inputs`: from
the options, else from our checkpoints' training config); this module only picks the probe splits of that
source. Nothing here computes features. Errors are one-line :class:`AnalysisInputError` (or the resolver's
AnalysisInputError, the loaders' DatasetError / VAEWeightsError / EncoderWeightsError).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import torch

from repa_probe.analysis.core.inputs import SHAPES_SIZES, DataSource, procedural_size, resolve_source
from repa_probe.analysis.errors import AnalysisInputError
from repa_probe.analysis.probes.linear import default_probe_data
from repa_probe.data import CappedDataset, DatasetError, build_dataset, collate
from repa_probe.data.segmentation import ADE20KSegmentation, VOCSegmentation

log = logging.getLogger("repa_probe")

TASK_DATASETS = {"linear": ("shapes", "digits", "imagefolder"), "segmentation": ("shapes", "voc", "ade20k")}
NEEDS_ROOT = ("imagefolder", "voc", "ade20k")


@dataclasses.dataclass
class ProbeData:
    """Train / test datasets of one probe task, shared by every checkpoint.

    ``num_classes``: classes of the probe (segmentation: mask classes); ``ignore_index``: mask value that
    is not scored (segmentation only); ``source``: the resolved data and VAE (resolution, ``vae``).
    """

    train: Any
    test: Any
    num_classes: int
    ignore_index: int | None
    source: DataSource

    @property
    def info(self) -> dict:
        return dict(self.source.info, num_classes=self.num_classes, num_train=len(self.train),
                    num_test=len(self.test))


def _capped(ds, n: int | None, what: str):
    if n is None or n == len(ds):
        return ds
    if not 0 < n <= len(ds):
        raise AnalysisInputError(f"--num-{what} {n} must be in 1..{len(ds)} (size of the {what} split)")
    return CappedDataset(ds, n)


def probe_split(task: str, source: DataSource, split: str, num: int | None):
    """One split (``"train"`` or ``"test"``) of the probe dataset ``source.name``, capped to ``num`` samples
    (evenly spaced; shapes: :data:`~repa_probe.analysis.core.inputs.SHAPES_SIZES`).

    ``test`` is the held-out split: shapes ``val``, digits ``test``, imagefolder ``root/val``, VOC ``val``,
    ADE20K ``validation``.
    """
    name, root, res = source.name, source.root, source.resolution
    if name not in TASK_DATASETS[task]:
        raise AnalysisInputError(f"--data {name!r} is not a {task} probe dataset; choose from "
                              f"{', '.join(TASK_DATASETS[task])}")
    if name in NEEDS_ROOT and not root:
        raise AnalysisInputError(f"--data {name} needs a directory: --data {name} DIR")
    held_out = "val" if split == "test" else "train"
    if name == "shapes":
        extra = {"num_classes": source.classes} if source.classes is not None else {}
        num = procedural_size(num, SHAPES_SIZES[split], f"--num-{split}")
        return build_dataset("shapes", split=held_out, resolution=res, num_samples=num,
                             seed=source.seed, **extra)
    if name == "voc":
        ds = VOCSegmentation(root, held_out, resolution=res)
    elif name == "ade20k":
        ds = ADE20KSegmentation(root, held_out, resolution=res)
    else:
        ds = build_dataset(name, root=root, split=held_out, resolution=res, seed=source.seed)
    return _capped(ds, num, split)


def resolve_probe_data(entries: Sequence, options) -> ProbeData:
    """Train / test datasets of ``options.task`` and the VAE, checked against every model's input
    (``options``: :class:`~repa_probe.analysis.core.options.ProbeOptions`)."""
    task = options.task
    source = resolve_source(entries, options)
    probe_name = default_probe_data(source.name) if task == "linear" and source.from_config else source.name
    if probe_name != source.name:
        log.info("linear probe of a %s run: probing %s (pass --data to choose)", source.name, probe_name)
        source = dataclasses.replace(source, name=probe_name, root=None, classes=None)
    if source.from_config and source.name not in TASK_DATASETS[task]:
        raise AnalysisInputError(f"the checkpoints were trained on {source.name!r}, which is not a {task} probe "
                              f"dataset; pass --data ({', '.join(TASK_DATASETS[task])})")
    train = probe_split(task, source, "train", options.num_train)
    test = probe_split(task, source, "test", options.num_test)
    names = [getattr(d, "class_names", None) for d in (train, test)]
    if None not in names and list(names[0]) != list(names[1]):
        extra = sorted(set(names[0]) ^ set(names[1]))[:3]
        raise AnalysisInputError(f"the train and test splits of {source.name} have different classes (e.g. {extra}): "
                              "their labels would not mean the same thing")
    if task == "segmentation":
        num_classes = int(getattr(train, "num_mask_classes", getattr(train, "num_classes", 0)))
        ignore = int(getattr(train, "ignore_index", 255))
    else:
        num_classes, ignore = int(train.num_classes), None
    return ProbeData(train, test, num_classes, ignore, source)


def collect_masks(dataset, batch_size: int = 64) -> torch.Tensor:
    """Every sample's ``mask`` as one int64 ``(N, H, W)`` tensor, checking that each mask has its image's size."""
    from torch.utils.data import DataLoader

    out = []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate):
        if "mask" not in batch:
            raise DatasetError(f"{type(dataset).__name__} has no segmentation masks")
        m, img = batch["mask"], batch["image"]
        if m.shape[-2:] != img.shape[-2:]:
            raise DatasetError(f"masks are {tuple(m.shape[-2:])} but images are {tuple(img.shape[-2:])}")
        out.append(m.to(torch.int64))
    return torch.cat(out)
