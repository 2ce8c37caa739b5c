"""Figures of the alignment analysis (one PDF + PNG each, drawn in the shared style of
:mod:`repa_probe.analysis.core.plots`): per checkpoint a layer × timestep heatmap and a by-layer plot; per
metric the checkpoints compared at one timestep; per run the training curve.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import seaborn as sns
from matplotlib.ticker import FuncFormatter, MaxNLocator

from repa_probe.analysis.core.plots import (LAYER_LABEL, TIME_LABEL, _band, _figure, _legend, _lines, _palette,
                                            _step_label, _style, frame, save_figure, slug, time_tag, time_value)

METRIC_NAMES = {"cknna": "CKNNA", "mutual_knn": "Mutual k-NN", "cka": "Linear CKA", "unbiased_cka": "Unbiased CKA",
                "cycle_knn": "Cycle k-NN"}
MAX_STEP_LINES = 6  # layers drawn in the training-step plot (evenly spaced), plus the best layer


def heatmap(rows, checkpoint: str, metric: str, stem: Path) -> list[Path]:
    """Layer (rows, block 1 on top) × timestep (columns) heatmap of one checkpoint's ``metric``."""
    df = frame(rows)
    df = df[(df.checkpoint == checkpoint) & (df.metric == metric)]
    grid = df.pivot_table(index="layer", columns="timestep", values="value", aggfunc="mean").sort_index()
    with _style():
        fig, ax = _figure(max(4.5, 0.55 * grid.shape[1] + 2.5), max(3.5, 0.35 * grid.shape[0] + 1.5))
        sns.heatmap(grid, ax=ax, cmap="viridis", annot=grid.size <= 160, fmt=".2f", annot_kws={"fontsize": 7},
                    cbar_kws={"label": METRIC_NAMES.get(metric, metric)}, linewidths=0.3, linecolor="white")
        ax.set_xlabel(TIME_LABEL)
        ax.set_ylabel(LAYER_LABEL)
        ax.set_xticklabels([f"{float(t):g}" for t in grid.columns], rotation=0)
        ax.set_title(f"{METRIC_NAMES.get(metric, metric)}: {checkpoint}")
        return save_figure(fig, stem)


def by_layer(rows, checkpoint: str, metric: str, stem: Path) -> list[Path]:
    """``metric`` vs block for one checkpoint, one line per timestep (CI bands with bootstrap)."""
    df = frame(rows)
    df = df[(df.checkpoint == checkpoint) & (df.metric == metric)]
    n = df.timestep.nunique()
    with _style():
        fig, ax = _figure(6.5, 4.0)
        _lines(ax, df, "layer", "timestep", _palette(n, ordered=True), lambda t: f"{float(t):g}")
        ax.set_xlabel(LAYER_LABEL)
        ax.set_ylabel(METRIC_NAMES.get(metric, metric))
        ax.set_title(checkpoint)
        ax.xaxis.get_major_locator().set_params(integer=True)
        _legend(ax, "t")
        return save_figure(fig, stem)


def by_layer_checkpoints(rows, timestep, metric: str, stem: Path) -> list[Path]:
    """``metric`` vs block at one timestep, one line per checkpoint (the REPA paper's layer figure)."""
    df = frame(rows)
    df = df[(df.timestep == time_value(timestep)) & (df.metric == metric)]
    order = {c: i for i, c in enumerate(dict.fromkeys(df.checkpoint))}  # keep the analysis order
    df = df.assign(_order=df.checkpoint.map(order))
    n = len(order)
    labels = {i: c for c, i in order.items()}
    with _style():
        fig, ax = _figure(7.5, 4.0)
        _lines(ax, df, "layer", "_order", _palette(n, ordered=n > 10), lambda i: labels[i])
        ax.set_xlabel(LAYER_LABEL)
        ax.set_ylabel(METRIC_NAMES.get(metric, metric))
        ax.set_title(f"t = {time_value(timestep):g}")
        ax.xaxis.get_major_locator().set_params(integer=True)
        _legend(ax, "checkpoint")
        return save_figure(fig, stem)


def by_step(rows, timestep, metric: str, stem: Path, checkpoints: Iterable[str] | None = None) -> list[Path]:
    """``metric`` vs training step at one timestep: up to six evenly spaced blocks plus the best block
    at each step (dashed black). ``checkpoints``: restrict to these (one run)."""
    df = frame(rows)
    df = df[(df.timestep == time_value(timestep)) & (df.metric == metric) & df.step.notna()]
    if checkpoints is not None:
        df = df[df.checkpoint.isin(list(checkpoints))]
    layers = sorted(df.layer.unique())
    if len(layers) > MAX_STEP_LINES:
        layers = sorted({layers[int(round(i))] for i in np.linspace(0, len(layers) - 1, MAX_STEP_LINES)})
    with _style():
        fig, ax = _figure(6.5, 4.0)
        _lines(ax, df[df.layer.isin(layers)], "step", "layer", _palette(len(layers), ordered=True),
               lambda v: f"block {v}", bands=False)
        best = df.loc[df.groupby("step")["value"].idxmax()].sort_values("step")
        ax.plot(best.step, best.value, linestyle="--", color="black", linewidth=1.5, label="best block")
        _band(ax, best, "step", "black")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
        ax.xaxis.set_major_formatter(FuncFormatter(_step_label))
        ax.set_xlabel("Training step")
        ax.set_ylabel(METRIC_NAMES.get(metric, metric))
        ax.set_title(f"t = {time_value(timestep):g}")
        _legend(ax, None)
        return save_figure(fig, stem)


def make_figures(rows, out_dir, plot_timestep, runs: dict | None = None) -> list[Path]:
    """All figures for an analysis: per checkpoint a heatmap and a by-layer plot; per metric the
    checkpoints compared at ``plot_timestep``; per run with two or more steps, the training curve.
    ``runs``: checkpoint label -> run name (or None). Returns the written paths."""
    df = frame(rows)
    out, paths = Path(out_dir), []
    for metric in dict.fromkeys(df.metric):
        for ckpt in dict.fromkeys(df[df.metric == metric].checkpoint):  # REG's class-token metrics: REG only
            paths += heatmap(rows, ckpt, metric, out / f"heatmap_{slug(ckpt)}_{metric}")
            paths += by_layer(rows, ckpt, metric, out / f"layers_{slug(ckpt)}_{metric}")
        paths += by_layer_checkpoints(rows, plot_timestep, metric,
                                      out / f"layers_t{time_tag(plot_timestep)}_{metric}")
        for run in sorted({r for r in (runs or {}).values() if r is not None}):
            members = [c for c, r in runs.items() if r == run]
            if df[df.checkpoint.isin(members) & (df.metric == metric)].step.nunique() >= 2:
                paths += by_step(rows, plot_timestep, metric, out / f"steps_{slug(run)}_t{time_tag(plot_timestep)}_"
                                 f"{metric}", checkpoints=members)
    return paths
