"""Frozen-encoder targets of a dataset: ``(N, D)`` / ``(N, T, D)`` features, cached on disk by encoder and data.

The cache key covers the encoder (:attr:`TargetEncoder.cache_key`: name, weights, resolution, preprocessing)
and the dataset (:func:`dataset_identity`: class, root, split, size, subset, a content fingerprint), so a
cached file is reused only for the same features. Files are written atomically and read with
``weights_only=True``; an unreadable or mismatched file is recomputed, with a warning.
"""
from __future__ import annotations

import hashlib
import json
import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from repa_probe.analysis.core.features import batch_loader, module_device
from repa_probe.analysis.errors import AnalysisInputError
from repa_probe.checkpoint import atomic_save

log = logging.getLogger("repa_probe")

ENCODER_KINDS = ("cls", "mean_patch", "patch")
CACHE_VERSION = "features-v1"  # bump when cached encoder features change meaning


def _unwrap(dataset):
    """The innermost dataset under CappedDataset (``base``) / torch Subset (``dataset``) views."""
    while True:
        inner = next((d for d in (getattr(dataset, "base", None), getattr(dataset, "dataset", None))
                      if isinstance(d, Dataset)), None)
        if inner is None:
            return dataset
        dataset = inner


def dataset_identity(dataset) -> dict:
    """What identifies ``dataset`` for caching: class, root, resolution, split, num_samples, seed, length,
    the subset indices of a capped view, and a fingerprint of the first, middle and last images."""
    core = _unwrap(dataset)
    ident: dict[str, Any] = {"class": type(core).__name__, "len": len(dataset)}
    for attr in ("root", "data_dir", "resolution", "split", "num_samples", "seed", "num_classes"):
        value = getattr(core, attr, None)
        if isinstance(value, (str, int, float, bool, Path)):
            ident[attr] = str(value) if isinstance(value, Path) else value
    subset = getattr(dataset, "indices", None)
    if subset is not None and dataset is not core:
        ident["subset_sha"] = hashlib.sha256(torch.as_tensor(subset).numpy().tobytes()).hexdigest()[:16]
    n = len(dataset)
    h = hashlib.sha256()
    for i in sorted({0, n // 2, n - 1}) if n else []:
        h.update(dataset[i]["image"].contiguous().numpy().tobytes())
    ident["content_sha"] = h.hexdigest()[:16]
    return ident


def encoder_cache_key(encoder, dataset, kind: str) -> str:
    """sha256 of ``encoder.cache_key``, :func:`dataset_identity`, N and ``kind``."""
    blob = json.dumps({"v": CACHE_VERSION, "encoder": encoder.cache_key, "data": dataset_identity(dataset),
                       "n": len(dataset), "kind": kind}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _read_cache(path: Path, key: str, n: int):
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a broken cache file is recomputed, not fatal
        log.warning("ignoring unreadable feature cache %s (%s)", path, type(exc).__name__)
        return None
    feats = obj.get("features") if isinstance(obj, dict) else None
    if not torch.is_tensor(feats) or obj.get("key") != key or feats.shape[0] != n:
        log.warning("ignoring feature cache %s: it does not match this encoder/dataset", path)
        return None
    return feats


@torch.no_grad()
def encoder_features(encoder, dataset, kind: str = "cls", cache_dir=None, batch_size: int = 64, device=None,
                     num_workers: int = 0, progress: bool = True) -> torch.Tensor:
    """Target features of every sample of ``dataset``: ``cls`` / ``mean_patch`` -> ``(N, D)``, ``patch``
    -> ``(N, T, D)``, float32 on the CPU.

    With ``cache_dir`` the result is stored as ``{cache_dir}/{kind}-{key}.pt`` (``torch.save`` of a dict of
    tensors and strings, read back with ``weights_only=True``) under :func:`encoder_cache_key`, and a
    later call with the same encoder, dataset and N loads it instead of running the encoder.
    ``device``: where the encoder is (default: its own device); images are moved there batch by batch.
    """
    if kind not in ENCODER_KINDS:
        raise AnalysisInputError(f"encoder feature kind must be one of {ENCODER_KINDS}, got {kind!r}")
    n = len(dataset)
    path = key = None
    if cache_dir is not None:
        key = encoder_cache_key(encoder, dataset, kind)
        path = Path(cache_dir) / f"{kind}-{key[:32]}.pt"
        if path.is_file():
            cached = _read_cache(path, key, n)
            if cached is not None:
                log.info("encoder features: cache hit %s", path)
                return cached
    device = module_device(encoder, device, "encoder")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    out = []
    for batch in tqdm(batch_loader(dataset, batch_size, num_workers), desc=f"encoder {kind}", disable=not progress,
                      leave=False):
        with autocast:
            out.append(encoder.features(batch["image"].to(device), kind).float().cpu())
    feats = torch.cat(out)
    if path is not None:
        atomic_save({"key": key, "kind": kind, "encoder": encoder.cache_key, "features": feats}, path)
    return feats
