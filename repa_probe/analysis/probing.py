"""Probe runs: checkpoints → hidden states → linear / segmentation probes → CSV, JSON and figures.

For every checkpoint × block × timestep, the block output of the noisy input (user time t: 0 = clean,
1 = noise; see :mod:`repa_probe.analysis.features`) is probed:

- ``task="linear"``: mean-pooled tokens ``(N, D)`` → :func:`~repa_probe.analysis.probes.fit_linear_probe` (top-1,
  top-5) on the dataset's class labels;
- ``task="segmentation"``: patch tokens ``(N, T, D)`` → :func:`~repa_probe.analysis.probes.fit_segmentation_probe`
  (mIoU, pixel accuracy) on the per-pixel masks.

The model always receives its null class (unconditional features): feeding the true class would hand
the probe its answer. Optional reference rows probe the target encoder itself (CLS and mean-patch
features for the linear probe, patch tokens for segmentation) on the same images.

Outputs in ``out_dir``: ``{prefix}.csv`` (one row per checkpoint, source, layer, timestep, metric),
``{prefix}.json`` (settings, rows and every probe's details: chosen hyper-parameters, held-out sweep,
per-class IoU) and ``figures/{prefix}_{metric}.{pdf,png}``; prefix = "probe" or "segment". The CSV is
rewritten after every checkpoint, so a long run leaves partial results behind.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Sequence

import torch

from repa_probe.analysis.inputs import (checkpoint_paths, load_entries, meta_model, objective_for, parse_layer_list,
                               parse_timestep_list, reload_model, resolve_device)
from repa_probe.analysis.features import extract_features, prepare_inputs, resolve_layers
from repa_probe.analysis.probes import fit_linear_probe, fit_segmentation_probe
from repa_probe.analysis.probes.inputs import ProbeSetupError, collect_masks, resolve_probe_data, resolve_reference_encoder
from repa_probe.analysis.probes.plots import chance_levels, make_probe_figures
from repa_probe.analysis.targets import encoder_features

log = logging.getLogger("repa_probe")

CSV_COLUMNS = ("checkpoint", "step", "source", "layer", "timestep", "metric", "value", "num_train", "num_test")
TASKS = {  # task -> (output prefix, pooling, metrics, encoder reference kinds)
    "linear": ("probe", "mean", ("top1", "top5"), ("cls", "mean_patch")),
    "segmentation": ("segment", "tokens", ("miou", "pixel_acc"), ("patch",)),
}
DEFAULT_TIMESTEPS = (0.0, 0.25, 0.5)


def layer_groups(layers: Sequence[int], num_samples: int, values_per_sample: int, budget_bytes: float) -> list:
    """Split ``layers`` into consecutive groups whose float32 features (``num_samples`` x
    ``values_per_sample`` per layer) fit in ``budget_bytes``; at least one layer per group."""
    per_layer = 4.0 * num_samples * values_per_sample
    size = max(1, int(budget_bytes // max(per_layer, 1.0)))
    return [list(layers[i:i + size]) for i in range(0, len(layers), size)]


def _metric_rows(task: str, result, base: dict) -> list[dict]:
    return [dict(base, metric=k, value=v, num_train=result.num_train, num_test=result.num_test)
            for k, v in result.metrics().items()]  # top5 only with more than 5 classes


def write_csv(rows: Sequence[dict], path: Path) -> None:
    """Rows → CSV with :data:`CSV_COLUMNS` (empty cells for missing layer / timestep / step)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return repr(obj)


def _clean(obj):
    """NaN / inf floats → None, recursively (strict JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def run_probes(task: str, ckpts: Sequence, out_dir, data=None, data_root=None, layers="all",
               timesteps=DEFAULT_TIMESTEPS, backend: str = "sklearn", num_train: int | None = None,
               num_test: int | None = None, encoder_reference: bool = False, encoder: str | None = None,
               encoder_weights=None, random_encoder: bool = False, vae=None, family=None, device="auto",
               batch_size: int = 64, seed: int = 0, probe_options: dict | None = None, cache_dir=None,
               max_feature_gb: float = 4.0, progress: bool = True) -> dict:
    """Probe every checkpoint (``task`` "linear" or "segmentation") and write CSV, JSON and figures.

    Args:
        ckpts: checkpoint files or run directories (every checkpoint in ``{run}/checkpoints``).
        data, data_root: dataset name (linear: shapes | digits | imagefolder; segmentation: shapes | voc |
            ade20k) and its folder; None = the training dataset of our checkpoints.
        layers: "all" or 1-based blocks ("1,4,8" or a list); timesteps: user times (string or list).
        backend: linear probe backend ("sklearn" | "torch"); ignored for segmentation.
        num_train, num_test: samples of each split (None = the whole split; shapes 2000 / 500).
        encoder_reference: add rows for the target encoder itself (``encoder`` / ``encoder_weights`` /
            ``random_encoder`` pick it; default: the training config's encoder).
        vae, family: override the training config's VAE / the detected model family (official files).
        probe_options: extra keywords for the probe function (e.g. ``epochs``, ``lr``, ``Cs``).
        cache_dir: cache of encoder features (default ``{out_dir}/cache``).
        max_feature_gb: memory budget for one extraction pass; more layers are split into several passes.

    Returns the summary dict that is also written as ``{prefix}.json``.
    """
    if task not in TASKS:
        raise ProbeSetupError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    prefix, pool, metrics, ref_kinds = TASKS[task]
    if task == "linear" and backend not in ("sklearn", "torch"):
        raise ProbeSetupError(f"--backend must be sklearn or torch, got {backend!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = out / "cache" if cache_dir is None else Path(cache_dir)
    dev = resolve_device(device)
    timesteps = parse_timestep_list(timesteps)
    layer_spec = parse_layer_list(layers)
    if not timesteps:
        raise ProbeSetupError("no timesteps given")
    if batch_size < 1 or max_feature_gb <= 0:
        raise ProbeSetupError(f"--batch-size must be >= 1 and the feature budget > 0, got {batch_size}, "
                              f"{max_feature_gb}")
    options = dict(probe_options or {})

    # ---- validate everything before the heavy work
    entries = load_entries(checkpoint_paths(ckpts), family=family)
    objectives, layer_lists = {}, {}
    for e in entries:
        obj = objectives[e.label] = objective_for(e)
        try:
            obj.parse_timesteps(timesteps)
            layer_lists[e.label] = resolve_layers(e.model if e.model is not None else meta_model(e), layer_spec)
        except ValueError as exc:
            raise ProbeSetupError(f"{e.label}: {str(exc).splitlines()[0]}") from None
    pdata = resolve_probe_data(entries, task, data, data_root, vae, num_train, num_test, seed)
    enc = None
    if encoder_reference:
        enc = resolve_reference_encoder(entries, pdata.resolution, encoder, encoder_weights, random_encoder, seed)

    # ---- inputs and targets, shared by every checkpoint
    vae_model = pdata.vae.to(dev) if pdata.vae is not None else None
    inputs = {s: prepare_inputs(getattr(pdata, s), vae_model, batch_size, progress=progress) for s in ("train", "test")}
    # The noise of an image is keyed by (seed, index). Test indices continue after the training ones, so no
    # test image shares its noise with a training image: with shared noise, a probe could read the label
    # off the noise pattern whenever labels follow the index (shapes: label = index % classes).
    inputs["test"] = dataclasses.replace(inputs["test"], indices=inputs["test"].indices + len(inputs["train"]))
    if task == "linear":
        targets = {s: inputs[s].labels for s in inputs}
    else:
        targets = {s: collect_masks(getattr(pdata, s), batch_size) for s in inputs}

    def fit(train_x, test_x):
        if task == "linear":
            return fit_linear_probe(train_x, targets["train"], test_x, targets["test"], backend=backend,
                                    num_classes=pdata.num_classes, seed=seed,
                                    device=dev if backend == "torch" else None, **options)
        return fit_segmentation_probe(train_x, targets["train"], test_x, targets["test"], pdata.num_classes,
                                      ignore_index=pdata.ignore_index, device=dev, seed=seed, **options)

    rows: list[dict] = []
    details: list[dict] = []
    t_start = time.perf_counter()
    if enc is not None:
        enc = enc.to(dev)
        for kind in ref_kinds:
            feats = {s: encoder_features(enc, getattr(pdata, s), kind, cache_dir=cache_dir, batch_size=batch_size,
                                         progress=progress) for s in ("train", "test")}
            res = fit(feats["train"], feats["test"])
            base = dict(checkpoint=f"encoder:{enc.name}", step=None, source=f"encoder:{kind}", layer=None,
                        timestep=None)
            rows += _metric_rows(task, res, base)
            details.append(dict(base, **res.to_dict()))
            log.info("%s reference %s %s: %s", prefix, enc.name, kind,
                     ", ".join(f"{k}={v:.4f}" for k, v in res.metrics().items()))
        enc = enc.to("cpu")

    for e in entries:
        model = (e.model if e.model is not None else reload_model(e)).to(dev).eval()
        per_sample = model.hidden_size * (model.num_tokens if pool == "tokens" else 1)
        n_total = len(inputs["train"]) + len(inputs["test"])
        groups = layer_groups(layer_lists[e.label], n_total, per_sample, max_feature_gb * 2 ** 30)
        log.info("%s: %s (%s, step %s), %d layer(s) x %d timestep(s) in %d pass(es) per timestep", prefix, e.label,
                 e.info.family, e.info.step, len(layer_lists[e.label]), len(timesteps), len(groups))
        for t in timesteps:
            for group in groups:
                feats = {s: extract_features(model, objectives[e.label], inputs[s], [t], group, pool=pool,
                                             device=dev, batch_size=batch_size, seed=seed, labels="null",
                                             progress=progress) for s in ("train", "test")}
                for layer in group:
                    res = fit(feats["train"].get(layer, t), feats["test"].get(layer, t))
                    base = dict(checkpoint=e.label, step=e.info.step, source="model", layer=layer, timestep=t)
                    rows += _metric_rows(task, res, base)
                    details.append(dict(base, **res.to_dict()))
                    log.info("%s %s block %d t=%g: %s", prefix, e.label, layer, float(t),
                             ", ".join(f"{k}={v:.4f}" for k, v in res.metrics().items()))
                del feats
        write_csv(rows, out / f"{prefix}.csv")
        e.model = None
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    write_csv(rows, out / f"{prefix}.csv")
    figures = make_probe_figures(rows, out / "figures", prefix, metrics,  # metrics without rows are skipped
                                 chance=chance_levels(task, pdata.num_classes))
    summary = {
        "task": task,
        "settings": dict(timesteps=timesteps, layers=layer_spec, backend=backend if task == "linear" else None,
                         pool=pool, batch_size=batch_size, device=str(dev), seed=seed, labels="null",
                         probe_options=options, encoder_reference=encoder_reference, **pdata.info,
                         time_convention="t=0 clean data, t=1 pure noise (REPA); SiT models get 1-t, DiT models "
                                         "the DDPM step round(t*999) (ints are steps)"),
        "checkpoints": [dict(label=e.label, path=str(e.path), run=e.run, step=e.info.step, family=e.info.family,
                             depth=e.info.config["depth"], objective=repr(objectives[e.label])) for e in entries],
        "encoder": None if enc is None else {"name": enc.name, "cache_key": enc.cache_key, "source": enc.source},
        "rows": rows,
        "details": details,
        "seconds": time.perf_counter() - t_start,
        "files": {"csv": f"{prefix}.csv", "figures": [str(p.relative_to(out)) for p in figures]},
    }
    (out / f"{prefix}.json").write_text(json.dumps(_clean(summary), indent=2, default=_json_default))
    return summary


def run_linear_probes(ckpts: Sequence, out_dir, **kwargs) -> dict:
    """:func:`run_probes` with ``task="linear"`` (top-1 / top-5 of mean-pooled block outputs)."""
    return run_probes("linear", ckpts, out_dir, **kwargs)


def run_segmentation_probes(ckpts: Sequence, out_dir, **kwargs) -> dict:
    """:func:`run_probes` with ``task="segmentation"`` (mIoU / pixel accuracy of patch tokens)."""
    return run_probes("segmentation", ckpts, out_dir, **kwargs)


__all__ = ["run_probes", "run_linear_probes", "run_segmentation_probes", "layer_groups", "write_csv",
           "CSV_COLUMNS", "TASKS"]
