"""The figure style every analysis shares: vector PDF + 200-dpi PNG, seaborn styling, colour-blind palettes,
line / band / legend helpers and the rows -> DataFrame conversion (:func:`frame`).

Rows are lists of dicts with (a subset of) the analysis CSV columns: checkpoint, step, layer, timestep,
metric, value, ci_low, ci_high, n; figures are written as ``<stem>.pdf`` and ``<stem>.png``.
Figures are drawn on matplotlib's Agg canvas directly (``Figure`` + ``FigureCanvasAgg``), so importing
this module changes neither the pyplot backend nor global rcParams.
"""
from __future__ import annotations

import math
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from repa_probe.reports.figures import save
from repa_probe.timesteps import Step, as_float, parse_time

TIME_LABEL = "t (0 = clean, 1 = noise)"
LAYER_LABEL = "Block (1-based)"
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
    """Tight layout, then ``stem.pdf`` (vector) and ``stem.png`` (200 dpi,
    :func:`repa_probe.reports.figures.save`). Returns both paths."""
    fig.tight_layout()
    return save(fig, stem)


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


def _step_label(x, _pos=None) -> str:
    """Training-step tick labels: 2500, 50k, 1.2M."""
    if abs(x) >= 1e6:
        return f"{x / 1e6:g}M"
    return f"{x / 1e3:g}k" if abs(x) >= 1e4 else f"{x:g}"
