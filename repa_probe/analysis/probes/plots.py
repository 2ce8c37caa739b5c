"""Probe figures: a metric (top-1, mIoU, ...) against the block, one panel per timestep, one line per
checkpoint, and the reference encoder as dashed horizontal lines. PDF + PNG, styled like the alignment
figures (:mod:`repa_probe.analysis.core.plots`: seaborn whitegrid / paper context, colour-blind palettes, Agg canvas,
no global pyplot state).

Rows are the ``probe.csv`` / ``segment.csv`` dicts: checkpoint, step, source ("model" or
"encoder:<kind>"), layer, timestep, metric, value.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from repa_probe.analysis.core.plots import LAYER_LABEL, _palette, _style, frame, save_figure, slug

METRIC_NAMES = {"top1": "Top-1 accuracy", "top5": "Top-5 accuracy", "miou": "mIoU", "pixel_acc": "Pixel accuracy"}
MAX_COLUMNS = 4
REFERENCE_STYLES = ("--", ":", "-.")


def _frame(rows: Iterable[dict], metric: str) -> pd.DataFrame:
    df = frame(rows)  # numeric value and timestep (step:N -> N / 999; encoder rows: NaN)
    if metric not in set(df.metric):
        raise ValueError(f"no probe rows with metric {metric!r} to plot")
    return df[df.metric == metric].copy()


def layer_curves(rows: Iterable[dict], metric: str, stem: Path, title: str | None = None,
                 chance: float | None = None) -> list[Path]:
    """``metric`` vs block, one panel per timestep (shared y axis), lines = checkpoints, dashed = encoder,
    dotted red = ``chance`` (the value of a probe that guesses: 1 / classes for top-1), when given.

    Writes ``stem.pdf`` and ``stem.png``; returns both paths.
    """
    df = _frame(rows, metric)
    model = df[df.source == "model"]
    refs = df[df.source != "model"]
    timesteps = sorted(model.timestep.dropna().unique(), key=float) or [None]
    checkpoints = list(dict.fromkeys(model.checkpoint))
    colours = dict(zip(checkpoints, _palette(len(checkpoints), ordered=len(checkpoints) > 10)))
    ncols = min(MAX_COLUMNS, len(timesteps))
    nrows = math.ceil(len(timesteps) / ncols)
    with _style():
        fig = Figure(figsize=(4.3 * ncols + (2.2 if len(checkpoints) > 4 else 0.6), 3.6 * nrows))
        FigureCanvasAgg(fig)
        axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False).ravel()
        handles: dict = {}
        for ax, t in zip(axes, timesteps):
            panel = model if t is None else model[model.timestep == t]
            for ckpt in checkpoints:
                g = panel[panel.checkpoint == ckpt].sort_values("layer")
                if len(g):
                    (h,) = ax.plot(g.layer.astype(int), g.value, marker="o", markersize=4, linewidth=1.8,
                                   color=colours[ckpt], label=ckpt)
                    handles.setdefault(ckpt, h)
            for style, (source, g) in zip(REFERENCE_STYLES * 4, refs.groupby("source", sort=True)):
                h = ax.axhline(float(g.value.mean()), color="0.25", linestyle=style, linewidth=1.4,
                               label=source.replace(":", " "))
                handles.setdefault(source.replace(":", " "), h)
            if chance is not None:
                handles.setdefault("chance", ax.axhline(chance, color="tab:red", linestyle=":", linewidth=1.2,
                                                        label="chance"))
            ax.set_title("" if t is None else f"t = {float(t):g}")
            ax.set_xlabel(LAYER_LABEL)
            ax.xaxis.get_major_locator().set_params(integer=True)
        for ax in axes[len(timesteps):]:
            ax.set_visible(False)
        for ax in axes[::ncols]:
            ax.set_ylabel(METRIC_NAMES.get(metric, metric))
        axes[min(len(timesteps), ncols) - 1].legend(handles.values(), handles.keys(), loc="upper left",
                                                    bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize="small")
        if title:
            fig.suptitle(title)
        return save_figure(fig, stem)


def make_probe_figures(rows: list[dict], out_dir: Path, prefix: str, metrics: Iterable[str],
                       title: str | None = None, chance: dict | None = None) -> list[Path]:
    """One :func:`layer_curves` figure per metric: ``{out_dir}/{prefix}_{metric}.{pdf,png}``; ``chance``:
    metric → chance level drawn as a dotted line (see :func:`chance_levels`)."""
    paths: list[Path] = []
    present = {r["metric"] for r in rows}
    for metric in metrics:
        if metric in present and any(r["source"] == "model" for r in rows if r["metric"] == metric):
            paths += layer_curves(rows, metric, Path(out_dir) / f"{slug(prefix)}_{slug(metric)}", title,
                                  (chance or {}).get(metric))
    return paths


def chance_levels(task: str, num_classes: int) -> dict:
    """Accuracy of a guess among ``num_classes`` balanced classes: top-1 = 1 / K, top-5 = 5 / K (linear task;
    segmentation metrics have no class-count-only chance level)."""
    return {"top1": 1.0 / num_classes, "top5": min(1.0, 5.0 / num_classes)} if task == "linear" else {}
