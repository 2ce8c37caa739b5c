"""Alignment analysis: how similar a diffusion transformer's hidden states are to a frozen encoder's.

For every checkpoint × block × timestep: mean-pooled block output of the noisy input (REPA's pooled
hidden state) against the encoder's representation of the clean image (``cls`` by default: platonic-rep
compares vision models by their CLS token (of every block, maximised over layer pairs); here the final-norm
CLS, the output REPA aligns to; ``mean_patch`` as an option), both prepared the
platonic-rep way (outlier clamp at the 0.95 quantile, then row L2 norm, per layer and timestep), then
CKNNA with k = 10 (or mutual_knn, cka, unbiased_cka, cycle_knn), optionally with half-sampling CIs.
REPA's own CKNNA code is unreleased (REPA issue #54), so this follows platonic-rep; it is our choice.

User time: t = 0 clean data, t = 1 pure noise (REPA's convention); see :mod:`repa_probe.analysis.features`.

:func:`alignment_table` works on in-memory objects and returns rows; :func:`run_alignment` goes from
checkpoint files to ``alignment.csv``, ``summary.json`` and figures, validating every input first.
"""
from __future__ import annotations

import csv
import functools
import json
import logging
import math
import platform
import subprocess
from pathlib import Path
from typing import Callable, Sequence

import torch

from repa_probe.analysis import metrics as M
from repa_probe.analysis.inputs import (DEFAULT_TIMESTEPS, METRICS, TARGET_KINDS, AlignmentError, checkpoint_paths, load_entries,
                               meta_model, objective_for, parse_layer_list, parse_metric_list,
                               parse_timestep_list, reload_model, resolve_context, resolve_device)
from repa_probe.analysis.features import FeatureError, ModelInputs, extract_features, prepare_inputs, resolve_layers
from repa_probe.analysis.spatial_alignment import spatial_analysis, split_metrics
from repa_probe.analysis.targets import dataset_identity, encoder_features

__all__ = ["alignment_table", "run_alignment", "best_layers", "write_csv", "metric_function",
           "check_metric_settings", "AlignmentError", "DEFAULT_TIMESTEPS", "METRICS", "KNN_METRICS",
           "TARGET_KINDS", "CSV_COLUMNS", "parse_timestep_list", "parse_layer_list", "parse_metric_list"]

log = logging.getLogger("repa_probe")

KNN_METRICS = ("cknna", "mutual_knn", "cycle_knn")
CSV_COLUMNS = ("checkpoint", "step", "layer", "timestep", "metric", "value", "ci_low", "ci_high", "n")


def metric_function(name: str, topk: int) -> Callable:
    """``f(a: (N, D_a), b: (N, D_b)) -> float`` for a metric name."""
    fns = {"cknna": M.cknna, "mutual_knn": M.mutual_knn, "cycle_knn": M.cycle_knn, "cka": M.cka,
           "unbiased_cka": M.unbiased_cka}
    if name not in fns:
        raise AlignmentError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}")
    return functools.partial(fns[name], topk=topk) if name in KNN_METRICS else fns[name]


def check_metric_settings(metrics: Sequence[str], n: int, topk: int, bootstrap: int) -> None:
    """Raise AlignmentError when N, k or the bootstrap cannot work together."""
    if n < 4:
        raise AlignmentError(f"need at least 4 samples, got N = {n}")
    if bootstrap and (bootstrap < 2):
        raise AlignmentError(f"--bootstrap must be 0 (off) or >= 2 replicates, got {bootstrap}")
    if any(m in KNN_METRICS for m in metrics):
        if topk < 2:
            raise AlignmentError(f"--topk must be >= 2, got {topk}")
        if topk >= n:
            raise AlignmentError(f"--topk {topk} must be smaller than the number of samples N = {n}")
        half = int(round(0.5 * n))
        if bootstrap and topk >= half:
            raise AlignmentError(f"--bootstrap resamples N/2 = {half} rows, which must exceed --topk {topk}")


# ------------------------------------------------------------------------------------------ the table
def alignment_table(model, objective, data, target, layers="all", timesteps=DEFAULT_TIMESTEPS,
                    metric: str | Sequence[str] = "cknna", topk: int = 10, bootstrap: int = 0, pool: str = "mean",
                    vae=None, device=None, batch_size: int = 64, seed: int = 0, labels: str = "null",
                    target_kind: str = "cls", checkpoint: str = "model", step: int | None = None,
                    cache_dir=None, progress: bool = True) -> list[dict]:
    """Alignment rows for one model, no files written.

    Args:
        model, objective: a DiffusionTransformer on ``device`` and its objective.
        data: a Dataset of dicts, or :class:`~repa_probe.analysis.features.ModelInputs` (then ``target`` must be
            a tensor).
        target: raw target features ``(N, D)`` (prepared here), or a TargetEncoder (its ``target_kind``
            features of ``data`` are computed, cached under ``cache_dir`` when given).
        layers, timesteps, pool, labels, seed, batch_size: see :func:`~repa_probe.analysis.features.extract_features`.
        metric: one name or several; ``topk`` for the kNN metrics; ``bootstrap`` replicates (0 = off).
    Returns:
        dicts with the :data:`CSV_COLUMNS` keys (``ci_low``/``ci_high`` None without bootstrap).
    """
    metrics = parse_metric_list(metric)
    device = next(model.parameters()).device if device is None else torch.device(device)
    if not isinstance(data, ModelInputs):
        if not torch.is_tensor(target):
            target = encoder_features(target, data, target_kind, cache_dir=cache_dir, batch_size=batch_size,
                                      progress=progress)
        data = prepare_inputs(data, vae, batch_size, progress=progress)
    elif not torch.is_tensor(target):
        raise AlignmentError("with precomputed ModelInputs, pass the target as a (N, D) tensor")
    n = len(data)
    if target.ndim != 2 or target.shape[0] != n:
        raise AlignmentError(f"target must be (N={n}, D), got {tuple(target.shape)}")
    check_metric_settings(metrics, n, topk, bootstrap)
    b = M.prepare_features(target.float()).to(device)
    rows = []
    for t in list(timesteps):
        fs = extract_features(model, objective, data, [t], layers, pool=pool, device=device, batch_size=batch_size,
                              seed=seed, labels=labels, progress=progress)
        for layer in fs.layers:
            a = M.prepare_features(fs.get(layer, t).float()).to(device)
            for name in metrics:
                fn = metric_function(name, topk)
                if bootstrap:
                    value, lo, hi = M.bootstrap(fn, a, b, n=bootstrap, seed=seed)
                else:
                    value, lo, hi = fn(a, b), None, None
                rows.append(dict(checkpoint=checkpoint, step=step, layer=layer, timestep=t, metric=name,
                                 value=float(value), ci_low=lo, ci_high=hi, n=n))
    return rows


def best_layers(rows: list[dict]) -> list[dict]:
    """For each (checkpoint, timestep, metric): the row with the highest value."""
    best: dict = {}
    for r in rows:
        key = (r["checkpoint"], r["timestep"], r["metric"])
        if key not in best or r["value"] > best[key]["value"]:
            best[key] = r
    return [dict(checkpoint=r["checkpoint"], step=r["step"], timestep=r["timestep"], metric=r["metric"],
                 best_layer=r["layer"], value=r["value"], ci_low=r["ci_low"], ci_high=r["ci_high"])
            for r in best.values()]


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})


def _versions() -> dict:
    import numpy

    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, text=True,
                                           capture_output=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def run_alignment(ckpts: Sequence, out_dir, timesteps=DEFAULT_TIMESTEPS, layers="all", metric="cknna",
                  topk: int = 10, bootstrap: int = 0, num_samples: int | None = None, batch_size: int = 256,
                  device: str = "auto", seed: int = 0, plot_timestep=None, cache_dir=None, progress: bool = True,
                  weights: str = "auto", **context) -> dict:
    """Checkpoints -> ``out_dir/alignment.csv``, ``out_dir/summary.json`` and ``out_dir/figures/*``.

    ``ckpts``: our checkpoints, official DiT/SiT/REPA files, or run directories (every checkpoint, by
    step). ``weights``: ``auto`` | ``ema`` | ``model`` (see :func:`~repa_probe.analysis.inputs.load_entries`).
    ``context`` (see :func:`~repa_probe.analysis.inputs.resolve_context`): ``data``,
    ``data_root``, ``split``, ``encoder``, ``encoder_weights``, ``random_encoder``, ``target_kind``,
    ``vae``, ``labels``, ``family``. Every input is validated (one-line errors) before any feature is
    computed. Returns the summary dict (also written to ``summary.json``).
    """
    from repa_probe.analysis import plots

    timesteps = parse_timestep_list(timesteps)
    layer_spec = parse_layer_list(layers)
    spatial_names, metric = split_metrics(metric)
    metrics = parse_metric_list(metric) if metric else []
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise AlignmentError(f"--batch-size must be a positive integer, got {batch_size!r}")
    dev = resolve_device(device)
    if num_samples is not None and (isinstance(num_samples, bool) or int(num_samples) < 1):
        raise AlignmentError(f"--num-samples must be a positive integer, got {num_samples!r}")
    if plot_timestep is not None and plot_timestep not in timesteps:
        raise AlignmentError(f"--plot-timestep {plot_timestep} is not one of --timesteps {timesteps}")

    entries = load_entries(checkpoint_paths(ckpts), family=context.get("family"), weights=weights)
    objectives = {}
    for e in entries:
        obj = objectives[e.label] = objective_for(e)
        try:
            obj.parse_timesteps(timesteps)
        except ValueError as exc:
            raise AlignmentError(f"{e.label}: --timesteps: {exc}") from None
        model_view = e.model if e.model is not None else meta_model(e)
        try:
            resolve_layers(model_view, layer_spec)
        except FeatureError as exc:
            raise AlignmentError(f"{e.label}: --layers: {exc}") from None
    ctx = resolve_context(entries, num_samples=num_samples, seed=seed, **context)
    n = len(ctx.dataset)
    check_metric_settings(metrics, n, topk, bootstrap)
    out = Path(out_dir)
    try:
        (out / "figures").mkdir(parents=True, exist_ok=True)
        (out / ".write_test").write_text("ok")
        (out / ".write_test").unlink()
    except OSError as exc:
        raise AlignmentError(f"--out {out} is not writable ({exc.strerror or exc})") from None

    # ---- heavy work from here on
    vae = ctx.vae.to(dev) if ctx.vae is not None else None
    inputs = prepare_inputs(ctx.dataset, vae, batch_size, progress=progress)
    target = encoder_features(ctx.encoder.to(dev), ctx.dataset, ctx.target_kind, cache_dir=cache_dir,
                              batch_size=batch_size, progress=progress) if metrics else None
    spatial = spatial_analysis(spatial_names, ctx, inputs, layers=layer_spec, timesteps=timesteps, device=dev,
                               batch_size=batch_size, seed=seed, labels=ctx.labels, bootstrap=bootstrap,
                               progress=progress)
    rows = []
    for e in entries:
        model = e.model if e.model is not None else reload_model(e)
        model = model.to(dev).eval()
        log.info("alignment: %s (%s, step %s)", e.label, e.info.family, e.info.step)
        if metrics:
            rows += alignment_table(model, objectives[e.label], inputs, target, layer_spec, timesteps, metrics, topk,
                                    bootstrap, device=dev, batch_size=batch_size, seed=seed, labels=ctx.labels,
                                    checkpoint=e.label, step=e.info.step, progress=progress)
        rows += spatial.rows(model, objectives[e.label], e.label, e.info.step) if spatial else []
        e.model = None
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    write_csv(rows, out / "alignment.csv")
    if plot_timestep is None:
        plot_timestep = min(timesteps, key=lambda v: (abs(float(v) - 0.5), float(v)))
    runs = {e.label: e.run for e in entries}
    model_rows = [r for r in rows if r["layer"] != "target"]  # the target's spatial rows are a reference
    figures = plots.make_figures(model_rows, out / "figures", plot_timestep=plot_timestep, runs=runs)
    summary = {
        "best": best_layers(model_rows),
        "spatial": spatial.describe() if spatial else None,
        "settings": dict(timesteps=timesteps, layers=layer_spec, metrics=metrics + spatial_names, topk=topk,
                         bootstrap=bootstrap, num_samples=n, batch_size=batch_size, device=str(dev), seed=seed,
                         pool="mean",
                         plot_timestep=plot_timestep, **ctx.describe(),
                         time_convention="t=0 clean data, t=1 pure noise (REPA); SiT models get 1-t, DiT "
                                         "models the DDPM step round(t*999) (ints are steps)",
                         feature_prep="platonic-rep: clamp |x| at the mean per-sample 0.95 quantile, then L2 "
                                      "rows; per (layer, timestep) on the model side"),
        "checkpoints": [dict(label=e.label, path=str(e.path), run=e.run, step=e.info.step, family=e.info.family,
                             time_convention=e.info.time_convention, source_format=e.info.source_format,
                             weights="ema" if e.info.ema else "model",
                             depth=e.info.config["depth"], objective=repr(objectives[e.label])) for e in entries],
        "dataset": dataset_identity(ctx.dataset),
        "encoder": {"name": ctx.encoder.name, "cache_key": ctx.encoder.cache_key, "source": ctx.encoder.source},
        "versions": _versions(),
        "files": {"csv": "alignment.csv", "figures": [str(p.relative_to(out)) for p in figures]},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    return summary


def _json_default(obj):
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)
