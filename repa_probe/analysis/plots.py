"""Figures of the analyses: vector PDF + 200-dpi PNG, seaborn styling, colour-blind palettes.

Every function takes the analysis rows (a list of dicts with the ``alignment.csv`` columns: checkpoint,
step, layer, timestep, metric, value, ci_low, ci_high, n) and writes ``<stem>.pdf`` and ``<stem>.png``.
Figures are drawn on matplotlib's Agg canvas directly (``Figure`` + ``FigureCanvasAgg``), so importing
this module changes neither the pyplot backend nor global rcParams.
"""
from __future__ import annotations

import math
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from repa_probe.timesteps import Step, as_float, parse_time

DPI = 200
METRIC_NAMES = {"cknna": "CKNNA", "mutual_knn": "Mutual k-NN", "cka": "Linear CKA", "unbiased_cka": "Unbiased CKA",
                "cycle_knn": "Cycle k-NN"}
TIME_LABEL = "t (0 = clean, 1 = noise)"
LAYER_LABEL = "Block (1-based)"
MAX_STEP_LINES = 6  # layers drawn in the training-step plot (evenly spaced), plus the best layer
MAX_BANDS = 5  # CI bands are drawn when a plot has at most this many lines (more would hide each other)


@contextmanager
def _style():
    """Seaborn 'whitegrid' + 'paper' context at readable sizes, only while a figure is built."""
    with sns.axes_style("whitegrid"), sns.plotting_context("paper", font_scale=1.35):
        yield


def _figure(width: float = 6.0, height: float = 4.0):
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def save_figure(fig: Figure, stem: Path) -> list[Path]:
    """Tight layout, then ``stem.pdf`` (vector) and ``stem.png`` (200 dpi). Returns both paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    paths = [stem.with_name(stem.name + ".pdf"), stem.with_name(stem.name + ".png")]
    fig.savefig(paths[0])
    fig.savefig(paths[1], dpi=DPI)
    return paths


def slug(text: str) -> str:
    """A file-name-safe version of ``text``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "x"


def time_value(t) -> float:
    """A table's time label (float, ``"step:N"``, or None for rows without a time) as a number for axes."""
    if t is None or (isinstance(t, float) and math.isnan(t)):
        return math.nan
    return as_float(parse_time(t))


def time_tag(t) -> str:
    """A time label for file names: ``0.5`` -> ``"0.5"``, ``"step:500"`` -> ``"step500"``."""
    t = parse_time(t)
    return f"step{t.n}" if isinstance(t, Step) else f"{t:g}"


def frame(rows: Iterable[dict]) -> pd.DataFrame:
    """Rows -> DataFrame with float ``value``/``ci_low``/``ci_high`` (NaN when missing) and numeric
    ``timestep`` (``step:N`` -> N / 999)."""
    df = pd.DataFrame(list(rows))
    if df.empty:
        raise ValueError("no rows to plot")
    for col in ("value", "ci_low", "ci_high"):
        df[col] = pd.to_numeric(df.get(col), errors="coerce")
    if "timestep" in df:
        df["timestep"] = df["timestep"].map(time_value)
    return df


def _palette(n: int, ordered: bool):
    """Colour-blind-safe colours: seaborn 'colorblind' for few unordered groups, else viridis (ordered)."""
    if not ordered and n <= 10:
        return sns.color_palette("colorblind", n)
    return sns.color_palette("viridis", n + 1)[:n] if n > 1 else sns.color_palette("viridis", 1)


def _band(ax, g: pd.DataFrame, x: str, colour) -> None:
    if g["ci_low"].notna().all() and g["ci_high"].notna().all():
        ax.fill_between(g[x], g["ci_low"], g["ci_high"], color=colour, alpha=0.18, linewidth=0)


def _lines(ax, df: pd.DataFrame, x: str, group: str, colours, label_fmt=str, bands: bool = True) -> None:
    """One line per ``group`` value (sorted), markers, and a CI band where ci_low/ci_high exist (only
    with ``bands`` and at most :data:`MAX_BANDS` lines)."""
    groups = sorted(df.groupby(group), key=lambda kv: kv[0])
    for colour, (key, g) in zip(colours, groups):
        g = g.sort_values(x)
        ax.plot(g[x], g["value"], marker="o", markersize=4, linewidth=1.8, color=colour, label=label_fmt(key))
        if bands and len(groups) <= MAX_BANDS:
            _band(ax, g, x, colour)


def _legend(ax, title: str | None) -> None:
    """Legend outside the axes on the right, so that it never hides a line."""
    ax.legend(title=title, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize="small")


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


def _step_label(x, _pos=None) -> str:
    """Training-step tick labels: 2500, 50k, 1.2M."""
    if abs(x) >= 1e6:
        return f"{x / 1e6:g}M"
    return f"{x / 1e3:g}k" if abs(x) >= 1e4 else f"{x:g}"


def make_figures(rows, out_dir, plot_timestep, runs: dict | None = None) -> list[Path]:
    """All figures for an analysis: per checkpoint a heatmap and a by-layer plot; per metric the
    checkpoints compared at ``plot_timestep``; per run with two or more steps, the training curve.
    ``runs``: checkpoint label -> run name (or None). Returns the written paths."""
    df = frame(rows)
    out, paths = Path(out_dir), []
    for metric in dict.fromkeys(df.metric):
        for ckpt in dict.fromkeys(df.checkpoint):
            paths += heatmap(rows, ckpt, metric, out / f"heatmap_{slug(ckpt)}_{metric}")
            paths += by_layer(rows, ckpt, metric, out / f"layers_{slug(ckpt)}_{metric}")
        paths += by_layer_checkpoints(rows, plot_timestep, metric,
                                      out / f"layers_t{time_tag(plot_timestep)}_{metric}")
        for run in sorted({r for r in (runs or {}).values() if r is not None}):
            members = [c for c, r in runs.items() if r == run]
            if df[df.checkpoint.isin(members)].step.nunique() >= 2:
                paths += by_step(rows, plot_timestep, metric, out / f"steps_{slug(run)}_t{time_tag(plot_timestep)}_"
                                 f"{metric}", checkpoints=members)
    return paths
