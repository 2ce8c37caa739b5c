"""Alignment analysis: how similar a diffusion transformer's hidden states are to a frozen encoder's.

For every checkpoint × block × timestep: mean-pooled block output of the noisy input (REPA's pooled
hidden state) against the encoder's representation of the clean image (``cls`` by default: platonic-rep
compares vision models by their CLS token (of every block, maximised over layer pairs); here the final-norm
CLS, the output REPA aligns to; ``mean_patch`` as an option), both prepared the
platonic-rep way (outlier clamp at the 0.95 quantile, then row L2 norm, per layer and timestep), then
CKNNA with k = 10 (or mutual_knn, cka, unbiased_cka, cycle_knn), optionally with half-sampling CIs.
REPA's own CKNNA code is unreleased (REPA issue #54), so this follows platonic-rep; it is our choice.

Time: user times as in :mod:`repa_probe.timesteps` (t = 0 clean data, t = 1 pure noise, or ``step:N``).

REG models: the mean-pooled features are the patch tokens'; the class token is analysed as its own "layer": its
hidden state at each block and timestep against the same target, in rows whose metric is ``<metric>_cls``
(e.g. ``cknna_cls``) — see :mod:`repa_probe.analysis.core.class_token` for the class token they are given.

:func:`alignment_table` works on in-memory objects and returns rows; :func:`run_alignment` goes from
checkpoint files to ``alignment.csv``, ``summary.json``, ``options.json`` and figures through the shared
run skeleton (:mod:`repa_probe.analysis.core.runner`), validating every input first.
"""
from __future__ import annotations

import functools
import logging
from typing import Callable, Sequence

import torch

from repa_probe.analysis import metrics as M
from repa_probe.analysis.alignment import plots
from repa_probe.analysis.alignment.spatial import SpatialAnalysis
from repa_probe.analysis.core.capture import MeanPool, capture, class_key
from repa_probe.analysis.core.class_token import attach_class_tokens, class_token_encoder
from repa_probe.analysis.core.features import CaptureSettings, InputsByVAE, ModelInputs, capture_spec, prepare_inputs
from repa_probe.analysis.core.inputs import (build_analysis_dataset, check_class_labels, check_times_and_layers,
                                             resolve_encoder, resolve_source)
from repa_probe.analysis.core.options import METRICS, TARGET_KINDS, AlignmentOptions
from repa_probe.analysis.core.runner import Analysis, Run, run_analysis
from repa_probe.analysis.core.targets import dataset_identity, encoder_features
from repa_probe.analysis.errors import AnalysisInputError
from repa_probe.reports.bootstrap import interval
from repa_probe.timesteps import TIME_HELP, label

__all__ = ["alignment_table", "run_alignment", "best_layers", "metric_function", "check_metric_settings",
           "AlignmentAnalysis", "AlignmentOptions", "AnalysisInputError", "METRICS", "KNN_METRICS", "TARGET_KINDS",
           "CSV_COLUMNS", "CLASS_TOKEN"]

log = logging.getLogger("repa_probe")

KNN_METRICS = ("cknna", "mutual_knn", "cycle_knn")
CSV_COLUMNS = ("checkpoint", "step", "layer", "timestep", "metric", "value", "ci_low", "ci_high", "n")
CLASS_TOKEN = "_cls"  # metric suffix of a REG model's class-token rows
FEATURE_PREP = ("platonic-rep: clamp |x| at the mean per-sample 0.95 quantile, then L2 rows; per (layer, "
                "timestep) on the model side")


def metric_function(name: str, topk: int) -> Callable:
    """``f(a: (N, D_a), b: (N, D_b)) -> float`` for a metric name."""
    fns = {"cknna": M.cknna, "mutual_knn": M.mutual_knn, "cycle_knn": M.cycle_knn, "cka": M.cka,
           "unbiased_cka": M.unbiased_cka}
    if name not in fns:
        raise AnalysisInputError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}")
    return functools.partial(fns[name], topk=topk) if name in KNN_METRICS else fns[name]


def check_metric_settings(metrics: Sequence[str], n: int, topk: int, bootstrap: int) -> None:
    """Raise AnalysisInputError when N, k or the bootstrap cannot work together (their own ranges are checked by
    :class:`AlignmentOptions`: ``topk >= 2``, ``bootstrap`` 0 or >= 2)."""
    if n < 4:
        raise AnalysisInputError(f"--num-samples: the metrics need at least 4 images, got N = {n}")
    if any(m in KNN_METRICS for m in metrics):
        if topk >= n:
            raise AnalysisInputError(f"--topk {topk} must be smaller than the number of images N = {n} (--num-samples)")
        half = int(round(0.5 * n))
        if bootstrap and topk >= half:
            raise AnalysisInputError(f"--bootstrap resamples N/2 = {half} rows, which must exceed --topk {topk}")


# ------------------------------------------------------------------------------------------ the table
def _inputs_and_target(data, target, opts: AlignmentOptions, vae) -> tuple[ModelInputs, torch.Tensor]:
    """``(ModelInputs, raw target (N, D))`` from a dataset + encoder, or as given (checked)."""
    if not isinstance(data, ModelInputs):
        if not torch.is_tensor(target):
            target = encoder_features(target, data, opts.target_kind, cache_dir=opts.cache_dir,
                                      batch_size=opts.batch_size, progress=opts.progress)
        data = prepare_inputs(data, vae, opts.batch_size, progress=opts.progress)
    elif not torch.is_tensor(target):
        raise AnalysisInputError("with precomputed ModelInputs, pass the target as a (N, D) tensor")
    n = len(data)
    if target.ndim != 2 or target.shape[0] != n:
        raise AnalysisInputError(f"target must be (N={n}, D), got {tuple(target.shape)}")
    return data, target


def cross_rows(pooled: dict, target: torch.Tensor, opts: AlignmentOptions, device) -> list[dict]:
    """Model-vs-encoder rows (no checkpoint / step yet) from mean-pooled features ``pooled[(layer, t)]: (N, D)``
    and the raw target ``(N, D)``, for the :data:`METRICS` among ``opts.metric``."""
    b = M.prepare_features(target.float()).to(device)
    n, rows = len(target), []
    for (layer, t), feats in pooled.items():
        if not isinstance(layer, int):
            continue                                  # a REG class token: with its block below
        a = M.prepare_features(feats.float()).to(device)
        cls = pooled.get((class_key(layer), t))
        cls = None if cls is None else M.prepare_features(cls.float()).to(device)
        for name in cross_metrics(opts.metric):
            row, fn = dict(layer=layer, timestep=label(t), metric=name, n=n), metric_function(name, opts.topk)
            rows.append(_with_interval(row, fn, a, b, opts))
            if cls is not None:                       # REG: the class token, its own "layer"
                rows.append(_with_interval(dict(row, metric=name + CLASS_TOKEN), fn, cls, b, opts))
    return rows


def alignment_table(model, objective, data, target, options: AlignmentOptions | None = None, *, vae=None,
                    device=None, checkpoint: str = "model", step: int | None = None) -> list[dict]:
    """Alignment rows for one model, no files written (one capture pass over every block and timestep).

    Args:
        model, objective: a DiffusionTransformer on ``device`` (default: its own) and its objective.
        data: a Dataset of dicts (images are encoded with ``vae`` when given), or
            :class:`~repa_probe.analysis.core.features.ModelInputs` (then ``target`` must be a tensor).
        target: raw target features ``(N, D)`` (prepared here), or a TargetEncoder (its ``target_kind``
            features of ``data`` are computed, cached under ``cache_dir`` when set).
        options: :class:`AlignmentOptions` (layers, timesteps, metric, topk, bootstrap, labels, seed,
            batch_size, target_kind, cache_dir, progress); default ``AlignmentOptions()``.
        checkpoint, step: the row labels.
    Returns:
        dicts with the :data:`CSV_COLUMNS` keys (``ci_low``/``ci_high`` None without bootstrap; with it also
        ``replicates`` (B,) and ``replicate_scale``, see :mod:`repa_probe.reports.bootstrap`).
    """
    opts = options or AlignmentOptions()
    if not cross_metrics(opts.metric):
        raise AnalysisInputError(f"alignment_table computes {', '.join(METRICS)}; got only {opts.metric} "
                             "(spatial metrics: repa_probe.analysis.alignment.spatial)")
    data, target = _inputs_and_target(data, target, opts, vae)
    check_metric_settings(cross_metrics(opts.metric), len(data), opts.topk, opts.bootstrap)
    spec = capture_spec(model, data, opts.timesteps, opts.layers, _capture_settings(opts, device))
    pooled = MeanPool()
    capture(model, objective, data, spec, [pooled])
    return [dict(checkpoint=checkpoint, step=step, **r) for r in cross_rows(pooled.features, target, opts, spec.device)]


def _capture_settings(opts: AlignmentOptions, device) -> CaptureSettings:
    return CaptureSettings(device=device, batch_size=opts.batch_size, seed=opts.seed, labels=opts.labels,
                           progress=opts.progress)


def _with_interval(row: dict, fn: Callable, a: torch.Tensor, b: torch.Tensor, opts: AlignmentOptions) -> dict:
    """``row`` with ``value`` and, with ``opts.bootstrap``, its half-sampling interval and ``replicates``
    (popped into ``replicates.npz`` by the run skeleton)."""
    if not opts.bootstrap:
        return dict(row, value=float(fn(a, b)), ci_low=None, ci_high=None)
    value, reps, scale = M.bootstrap_replicates(fn, a, b, n=opts.bootstrap, seed=opts.seed)
    low, high = interval(value, reps, scale)
    return dict(row, value=value, ci_low=low, ci_high=high, replicates=reps, replicate_scale=scale)


def cross_metrics(names: Sequence[str]) -> list[str]:
    """The model-vs-encoder metrics among ``names`` (the rest are spatial-structure metrics)."""
    return [n for n in names if n in METRICS]


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


# ----------------------------------------------------------------------------------- the analysis
class AlignmentAnalysis(Analysis):
    """Alignment as a :class:`~repa_probe.analysis.core.runner.Analysis`: one dataset, one encoder target and the
    same noisy inputs for every checkpoint. Spatial-structure metrics among ``options.metric`` (lds, cds,
    srss, rmsc) add per block x timestep rows from :class:`~repa_probe.analysis.alignment.spatial.SpatialAnalysis`
    and the target encoder's own rows (``layer = "target"``)."""

    name = "alignment"
    columns = CSV_COLUMNS

    def setup(self, run: Run) -> None:
        opts = run.options
        self.layers = check_times_and_layers(run.entries, opts)
        self.source = resolve_source(run.entries, opts, need_encoder=True)
        self.dataset, self.split = build_analysis_dataset(self.source, opts.split, opts.num_samples)
        if opts.labels == "true":  # the null class was checked by resolve_source
            check_class_labels(run.entries, opts.labels, getattr(self.dataset, "num_classes", None))
        self.encoder = resolve_encoder(run.entries, opts, self.source.resolution)
        self.cls_encoder = class_token_encoder(run.entries, self.encoder)
        self.cross = cross_metrics(opts.metric)
        self.spatial_names = [m for m in opts.metric if m not in self.cross]
        check_metric_settings(self.cross, len(self.dataset), opts.topk, opts.bootstrap)

    def prepare(self, run: Run) -> None:
        opts, vae = run.options, self.source.vae
        self.inputs = prepare_inputs(self.dataset, vae.to(run.device) if vae is not None else None,
                                     opts.batch_size, progress=opts.progress)
        attach_class_tokens(self.inputs, self.dataset, self.cls_encoder, opts, run.device)
        self.by_vae = InputsByVAE(self.dataset, self.inputs, vae, run.device, opts.batch_size, opts.progress)
        self.target = encoder_features(self.encoder.to(run.device), self.dataset, opts.target_kind,
                                       cache_dir=opts.cache_dir, batch_size=opts.batch_size,
                                       progress=opts.progress) if self.cross else None
        self.spatial = SpatialAnalysis(self.spatial_names, self.dataset, self.encoder, opts, run.device) \
            if self.spatial_names else None

    def analyse(self, run: Run, entry, model) -> list[dict]:
        """One capture pass per checkpoint: the mean-pooled blocks (CKNNA & co.) and the spatial metrics of the
        block tokens are reduced from the same forward passes."""
        opts = run.options
        inputs = self.by_vae.get(entry.vae)  # REPA-E checkpoints: their own VAE and latent statistics
        spec = capture_spec(model, inputs, opts.timesteps, self.layers[entry.label],
                            _capture_settings(opts, run.device))
        pooled = MeanPool() if self.cross else None
        spatial = self.spatial.reducer(model) if self.spatial is not None else None
        reducers = [r for r in (pooled, spatial) if r is not None]
        if reducers:
            capture(model, entry.objective, inputs, spec, reducers)
        rows = cross_rows(pooled.features, self.target, opts, run.device) if pooled is not None else []
        rows = [dict(checkpoint=entry.label, step=entry.info.step, **r) for r in rows]
        if spatial is not None:
            rows += self.spatial.rows(spatial.values, entry.label, entry.info.step)
        return rows

    def figures(self, run: Run, rows: list[dict]) -> list:
        runs = {e.label: e.run for e in run.entries}
        model_rows = [r for r in rows if r["layer"] != "target"]  # the target's spatial rows are a reference
        return plots.make_figures(model_rows, run.out / "figures", label(run.options.plot_timestep), runs=runs,
                                  which=run.options.figures)

    def summary(self, run: Run, rows: list[dict]) -> dict:
        opts = run.options
        settings = dict(split=self.split, num_samples=len(self.dataset), pool="mean", target_kind=opts.target_kind,
                        plot_timestep=label(opts.plot_timestep), labels=opts.labels, **self.source.info,
                        encoder_name=self.encoder.name, time_convention=TIME_HELP, feature_prep=FEATURE_PREP)
        return {"best": best_layers([r for r in rows if r["layer"] != "target"]),
                "spatial": self.spatial.describe() if self.spatial is not None else None, "settings": settings, "dataset": dataset_identity(self.dataset),
                "encoder": {"name": self.encoder.name, "cache_key": self.encoder.cache_key,
                            "source": self.encoder.source}}


def run_alignment(ckpts: Sequence, out_dir, options: AlignmentOptions | None = None) -> dict:
    """Checkpoints (files or run directories) -> ``out_dir/{alignment.csv, summary.json, options.json,
    figures/}``; every input is validated (one-line errors) before any feature is computed. Returns the
    summary dict."""
    return run_analysis(AlignmentAnalysis(), ckpts, out_dir, options or AlignmentOptions())
