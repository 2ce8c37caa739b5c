"""Figures of :mod:`repa_probe.analysis.correlation.correlate` in the project's style (:mod:`repa_probe.analysis.core.plots`).

``points``: the joined frame (run, checkpoint, step, x, y); ``stats``: the summary of
:func:`~repa_probe.analysis.correlation.correlate.correlate_table`. Each function writes ``<stem>.pdf`` and ``<stem>.png``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator

from repa_probe.analysis.core.plots import _figure, _legend, _palette, _step_label, _style, save_figure
from repa_probe.reports.numbers import fmt, fmt_interval

__all__ = ["scatter", "versus_step"]


def _colours(points: pd.DataFrame) -> dict:
    runs = list(dict.fromkeys(points["run"]))
    return dict(zip(runs, _palette(len(runs), ordered=False)))


def _stat_line(stats: dict, name: str, symbol: str) -> str:
    s = stats[name]
    p = "" if s["p_perm"] is None else f", p={fmt(s['p_perm'], 3)}"
    return f"{symbol} = {fmt_interval(s['r'], s['ci_low'], s['ci_high'])}{p}"


def scatter(points: pd.DataFrame, stats: dict, stem: Path) -> list[Path]:
    """y against x, one colour per run, each point labelled with its training step, least-squares line."""
    colours = _colours(points)
    with _style():
        fig, ax = _figure(7.0, 4.6)
        for run, g in points.groupby("run", sort=False):
            ax.scatter(g["x"], g["y"], s=36, color=colours[run], label=run, zorder=3, edgecolor="white", linewidth=0.5)
            for _, row in g.iterrows():
                if pd.notna(row["step"]):
                    ax.annotate(_step_label(row["step"]), (row["x"], row["y"]), textcoords="offset points",
                                xytext=(4, 3), fontsize=7, color=colours[run])
        if points["x"].nunique() > 1:
            slope, icpt = np.polyfit(points["x"], points["y"], 1)
            xs = np.linspace(points["x"].min(), points["x"].max(), 50)
            ax.plot(xs, slope * xs + icpt, color="black", linestyle="--", linewidth=1.2, zorder=2)
        ax.set_xlabel(stats["x"])
        ax.set_ylabel(stats["y"])
        ax.set_title(f"{_stat_line(stats, 'pearson', 'r')};  {_stat_line(stats, 'spearman', 'ρ')}  (n={stats['n']})",
                     fontsize="small")
        _legend(ax, "run")
        return save_figure(fig, stem)


def versus_step(points: pd.DataFrame, stats: dict, stem: Path) -> list[Path]:
    """x (left axis, solid, circles) and y (right axis, dashed, squares) against training step, per run."""
    colours = _colours(points)
    with _style():
        fig, ax = _figure(8.0, 4.2)
        ax2 = ax.twinx()
        for run, g in points.dropna(subset=["step"]).groupby("run", sort=False):
            g = g.sort_values("step")
            ax.plot(g["step"], g["x"], marker="o", markersize=4, linewidth=1.6, color=colours[run])
            ax2.plot(g["step"], g["y"], marker="s", markersize=4, linewidth=1.6, linestyle="--", color=colours[run])
        ax.set_xlabel("Training step")
        ax.set_ylabel(f"{stats['x']} (solid)")
        ax2.set_ylabel(f"{stats['y']} (dashed)")
        ax2.grid(False)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
        ax.xaxis.set_major_formatter(FuncFormatter(_step_label))
        handles = [Line2D([], [], color=c, linewidth=1.6, label=r) for r, c in colours.items()]
        handles += [Line2D([], [], color="grey", marker="o", label=stats["x"]),
                    Line2D([], [], color="grey", marker="s", linestyle="--", label=stats["y"])]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.2, 1.0), frameon=False, fontsize="small")
        return save_figure(fig, stem)
