"""What the probe runs are measured on: train / test datasets, the VAE, the reference encoder, masks.

Nothing here computes features. With no ``--data`` the dataset, VAE and encoder come from our
checkpoints' training config (which must agree across checkpoints); official checkpoints store no config,
so they need ``data`` (and ``encoder`` for a reference row). Errors are one-line :class:`ProbeSetupError`
(or the loaders' own DatasetError / VAEWeightsError / EncoderWeightsError).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import torch

from repa_probe.analysis.inputs import agreed
from repa_probe.analysis.probes.linear import default_probe_data
from repa_probe.errors import ReproError

log = logging.getLogger("repa_probe")

TASK_DATASETS = {"linear": ("shapes", "digits", "imagefolder"), "segmentation": ("shapes", "voc", "ade20k")}
NEEDS_ROOT = ("imagefolder", "voc", "ade20k")
SHAPES_DEFAULT = {"train": 2000, "test": 500}  # shapes is procedural: pick a size when none is given


class ProbeSetupError(ReproError, ValueError):
    """Bad options for a probe run (one-line message)."""


@dataclasses.dataclass
class ProbeData:
    """Train / test datasets of one probe task, shared by every checkpoint.

    ``num_classes``: classes of the probe (segmentation: mask classes); ``ignore_index``: mask value that
    is not scored (segmentation only); ``resolution``: image side R; ``vae``: LatentVAE or None (pixels).
    """

    train: Any
    test: Any
    num_classes: int
    ignore_index: int | None
    resolution: int
    vae: Any
    info: dict


def _capped(ds, n: int | None, what: str):
    from repa_probe.data import CappedDataset

    if n is None or n == len(ds):
        return ds
    if not 0 < n <= len(ds):
        raise ProbeSetupError(f"--num-{what} {n} must be in 1..{len(ds)} (size of the {what} split)")
    return CappedDataset(ds, n)


def probe_split(task: str, name: str, root, split: str, resolution: int, seed: int, num: int | None,
                shapes_classes: int | None = None):
    """One split ("train" or "test") of a probe dataset, capped to ``num`` samples (evenly spaced).

    ``test`` is the held-out split: shapes ``val``, digits ``test``, imagefolder ``root/val``, VOC ``val``,
    ADE20K ``validation``.
    """
    from repa_probe.data import build_dataset
    from repa_probe.analysis.probes.datasets import ADE20KSegmentation, VOCSegmentation

    if name not in TASK_DATASETS[task]:
        raise ProbeSetupError(f"--data {name!r} is not a {task} probe dataset; choose from "
                              f"{', '.join(TASK_DATASETS[task])}")
    if name in NEEDS_ROOT and not root:
        raise ProbeSetupError(f"--data {name} needs a directory: --data {name} DIR")
    if name == "shapes":
        n = num if num is not None else SHAPES_DEFAULT[split]
        extra = {"num_classes": shapes_classes} if shapes_classes is not None else {}
        return build_dataset("shapes", split="val" if split == "test" else "train", resolution=resolution,
                             num_samples=n, seed=seed, **extra)
    if name == "voc":
        ds = VOCSegmentation(root, "val" if split == "test" else "train", resolution=resolution)
    elif name == "ade20k":
        ds = ADE20KSegmentation(root, "val" if split == "test" else "train", resolution=resolution)
    else:
        ds = build_dataset(name, root=root, split="val" if split == "test" else "train", resolution=resolution,
                           seed=seed)
    return _capped(ds, num, split)


def resolve_probe_data(entries: Sequence, task: str, data=None, data_root=None, vae=None, num_train=None,
                       num_test=None, seed: int = 0) -> ProbeData:
    """Datasets and VAE for ``task`` ("linear" or "segmentation"), checked against every model's input."""
    from repa_probe.encoders.vae import load_vae

    ours = [e for e in entries if e.cfg is not None]
    official = [e.label for e in entries if e.cfg is None]
    if official and data is None:
        raise ProbeSetupError(f"official checkpoint(s) {', '.join(official)} store no training config: pass --data")
    first = entries[0].info.config
    if vae is None:
        vae = agreed(ours, "vae", lambda c: c.vae.name, ProbeSetupError) if ours else ("stabilityai/sd-vae-ft-ema"
                                                                         if first["in_channels"] == 4 else "none")
    vae_model = load_vae(vae)
    factor = vae_model.downsample_factor if vae_model is not None else 1
    channels = vae_model.latent_channels if vae_model is not None else 3
    shapes_classes = None
    if data is None:
        d = agreed(ours, "data", lambda c: dict(name=c.data.name, root=c.data.root, res=c.data.resolution,
                                                 seed=c.run.seed, classes=c.data.num_classes), ProbeSetupError)
        data, data_root, resolution, data_seed = d["name"], d["root"], d["res"], d["seed"]
        if task == "linear" and default_probe_data(data) != data:
            log.info("linear probe of a %s run: probing %s (pass --data to choose)", data, default_probe_data(data))
            data, data_root = default_probe_data(data), None
        shapes_classes = d["classes"] if data == "shapes" else None
        if data not in TASK_DATASETS[task]:
            raise ProbeSetupError(f"the checkpoints were trained on {data!r}, which is not a {task} probe dataset; "
                                  f"pass --data ({', '.join(TASK_DATASETS[task])})")
    else:
        resolution = ours[0].cfg.data.resolution if ours else first["input_size"] * factor
        data_seed = ours[0].cfg.run.seed if ours else seed
    for e in entries:
        c = e.info.config
        if (c["in_channels"], c["input_size"]) != (channels, resolution // factor):
            raise ProbeSetupError(f"{e.label}: model takes {c['in_channels']}x{c['input_size']}^2 inputs but the "
                                  f"data is {channels}x{resolution // factor}^2 ({resolution}px, vae {vae})")
        if c.get("class_dropout_prob", 0) <= 0:
            raise ProbeSetupError(f"{e.label}: the model has no null class, so its features cannot be read "
                                  "unconditionally (feeding the true class would leak the probe's target)")
    train = probe_split(task, data, data_root, "train", resolution, data_seed, num_train, shapes_classes)
    test = probe_split(task, data, data_root, "test", resolution, data_seed, num_test, shapes_classes)
    names = [getattr(d, "class_names", None) for d in (train, test)]
    if None not in names and list(names[0]) != list(names[1]):
        extra = sorted(set(names[0]) ^ set(names[1]))[:3]
        raise ProbeSetupError(f"the train and test splits of {data} have different classes (e.g. {extra}): their "
                              "labels would not mean the same thing")
    if task == "segmentation":
        num_classes = int(getattr(train, "num_mask_classes", getattr(train, "num_classes", 0)))
        ignore = int(getattr(train, "ignore_index", 255))
    else:
        num_classes, ignore = int(train.num_classes), None
    info = dict(data=str(data), data_root=data_root, resolution=resolution, vae=str(vae), num_classes=num_classes,
                num_train=len(train), num_test=len(test), data_seed=data_seed)
    return ProbeData(train, test, num_classes, ignore, resolution, vae_model, info)


def resolve_reference_encoder(entries: Sequence, resolution: int, encoder=None, encoder_weights=None,
                              random_encoder: bool = False, seed: int = 0):
    """The encoder of the reference rows: ``encoder`` (a registered name) when given, else the target encoder
    of our checkpoints' training config (rebuilt as the trainer builds it; must agree across checkpoints)."""
    if encoder is not None:
        from repa_probe.encoders.target import load_encoder

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return load_encoder(encoder, weights=encoder_weights, pretrained=not random_encoder,
                                resolution=resolution)
    ours = [e for e in entries if e.cfg is not None]
    if not ours:
        raise ProbeSetupError("--encoder-reference with official checkpoints only: pass --encoder NAME")
    agreed(ours, "encoder", lambda c: dict(name=c.encoder.name, weights=c.encoder.weights,
                                            pretrained=c.encoder.pretrained, source=c.encoder.source,
                                            size=c.encoder.input_size, seed=c.run.seed), ProbeSetupError)
    from repa_probe.analysis.inputs import build_config_encoder

    return build_config_encoder(ours[0].cfg)


def collect_masks(dataset, batch_size: int = 64) -> torch.Tensor:
    """Every sample's ``mask`` as one int64 ``(N, H, W)`` tensor, checking that each mask has its image's size."""
    from torch.utils.data import DataLoader

    from repa_probe.data import DatasetError, collate

    out = []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate):
        if "mask" not in batch:
            raise DatasetError(f"{type(dataset).__name__} has no segmentation masks")
        m, img = batch["mask"], batch["image"]
        if m.shape[-2:] != img.shape[-2:]:
            raise DatasetError(f"masks are {tuple(m.shape[-2:])} but images are {tuple(img.shape[-2:])}")
        out.append(m.to(torch.int64))
    return torch.cat(out)
