"""The figures papers draw, sized for a paper: a column (3.4 in) or a full page (7 in) wide, 8 pt fonts, the
Okabe-Ito colour-blind palette (with a marker per run), viridis heatmaps, each saved as a vector PDF and a PNG.

* :func:`heatmaps`: layer x timestep heatmaps of each run side by side on one shared colour scale;
* :func:`metric_vs_step`: metrics against training step per run, FD on a twin axis (dashed);
* :func:`scatter`: a correlation's points coloured by run, steps annotated, r in the title;
* :func:`probe_vs_block`: probe accuracy against block per run, with the chance and encoder lines.
"""
from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from typing import Optional

from matplotlib.ticker import MaxNLocator

COLUMN_IN, PAGE_IN = 3.4, 7.0
DPI = 200
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
STYLE = {"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7,
         "legend.fontsize": 7, "lines.linewidth": 1.2, "lines.markersize": 3.5, "axes.spines.top": False,
         "pdf.fonttype": 42, "svg.fonttype": "none"}


def run_style(runs: list[str]) -> dict:
    """run -> (colour, marker), stable in the study's run order."""
    return {r: (PALETTE[i % len(PALETTE)], MARKERS[i % len(MARKERS)]) for i, r in enumerate(runs)}


def styled(draw):
    """Run a drawing function under :data:`STYLE` (matplotlib's ``rc_context``: global rcParams untouched)."""
    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context(STYLE):
            return draw(*args, **kwargs)
    return wrapper


def _figure(width: str, height: float, panels: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(PAGE_IN if width == "page" else COLUMN_IN, height), layout="constrained")
    return fig, [fig.add_subplot(1, panels, k + 1) for k in range(panels)]


def save(fig, stem: Path) -> list[Path]:
    """``<stem>.pdf`` (vector) and ``<stem>.png`` (:data:`DPI`); returns both paths. Every figure file of the
    project is written here (the analyses' quick-look figures too)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger("fontTools").setLevel(logging.WARNING)  # its font subsetting logs every table at INFO
    paths = [stem.with_name(stem.name + ".pdf"), stem.with_name(stem.name + ".png")]
    fig.savefig(paths[0])
    fig.savefig(paths[1], dpi=DPI)
    return paths


@styled
def heatmaps(grids: dict, label: str, stem: Path) -> list[Path]:
    """``grids``: run -> ``{(block, t): value}``; one panel per run, block on y (1 at the bottom), timestep
    on x, one colour bar for all panels."""
    values = [v for g in grids.values() for v in g.values() if v is not None and math.isfinite(v)]
    if not values:
        return []
    lo, hi = min(values), max(values)
    n = len(grids)
    fig, axes = _figure("page" if n > 1 else "column", 2.3, n)
    image = None
    for ax, (run, grid) in zip(axes, grids.items()):
        blocks = sorted({b for b, _ in grid})
        times = sorted({t for _, t in grid}, key=lambda t: (not isinstance(t, (int, float)), t if isinstance(
            t, (int, float)) else str(t)))
        m = [[grid.get((b, t), math.nan) for t in times] for b in blocks]
        image = ax.imshow(m, origin="lower", aspect="auto", vmin=lo, vmax=hi, cmap="viridis")
        ax.set_xticks(range(len(times)), [f"{t:g}" if isinstance(t, float) else str(t) for t in times])
        ax.set_yticks(range(len(blocks)), [str(b) for b in blocks])
        ax.set_title(run)
        ax.set_xlabel("t (0 clean, 1 noise)")
        if ax is axes[0]:
            ax.set_ylabel("block")
    fig.colorbar(image, ax=axes, label=label, shrink=0.9)
    return save(fig, stem)


def _line(ax, pts: list, style: tuple, label: Optional[str], dashed: bool = False) -> None:
    """``pts``: ``[(x, y)]`` or ``[(x, y, low, high)]`` (a shaded band when every point has its interval)."""
    pts = sorted(p for p in pts if p[1] is not None)
    if not pts:
        return
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    ax.plot(xs, ys, color=style[0], marker=style[1], linestyle="--" if dashed else "-", label=label,
            markerfacecolor="white" if dashed else style[0])
    if all(len(p) > 3 and p[2] is not None for p in pts):
        ax.fill_between(xs, [p[2] for p in pts], [p[3] for p in pts], color=style[0], alpha=0.15, linewidth=0)


def _legend(fig, axes) -> None:
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        per_row = 6 if fig.get_figwidth() > COLUMN_IN else 3  # a column-wide legend wraps to more rows
        fig.legend(handles, labels, loc="outside upper center", ncol=min(len(labels), per_row), frameon=False)


@styled
def metric_vs_step(panels: dict, styles: dict, stem: Path, fd: Optional[dict] = None,
                   fd_label: Optional[str] = None) -> list[Path]:
    """``panels``: panel title -> run -> ``[(step, value, low, high)]``, one panel each (column width for
    one); ``fd``: run -> ``[(step, value)]`` drawn dashed (open markers) on a twin axis of the first panel."""
    if not panels:
        return []
    fig, axes = _figure("page" if len(panels) > 1 else "column", 2.5, len(panels))
    for ax, (title, series) in zip(axes, panels.items()):
        for run, pts in series.items():
            _line(ax, pts, styles[run], run)
        ax.set_ylabel(title)
        ax.set_xlabel("training step")
    if fd:
        twin = axes[0].twinx()
        twin.spines["right"].set_visible(True)
        for run, pts in fd.items():
            _line(twin, pts, styles[run], None, dashed=True)
        twin.set_ylabel(f"{fd_label} (dashed)")
    _legend(fig, axes)
    return save(fig, stem)


@styled
def scatter(points: list[dict], xlabel: str, ylabel: str, title: str, styles: dict, stem: Path) -> list[Path]:
    """``points``: ``{run, step, x, y}`` per checkpoint; steps annotated."""
    if not points:
        return []
    fig, (ax,) = _figure("column", 2.6)
    present = {p["run"] for p in points}
    for run in [r for r in styles if r in present] + sorted(present - set(styles)):
        mine = [p for p in points if p["run"] == run]
        colour, marker = styles.get(run, ("#000000", "o"))
        ax.scatter([p["x"] for p in mine], [p["y"] for p in mine], color=colour, marker=marker, label=run, s=14)
        for p in mine:
            ax.annotate(str(p["step"]), (p["x"], p["y"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(frameon=False)
    return save(fig, stem)


@styled
def probe_vs_block(panels: dict, chance: Optional[float], encoder: dict, label: str, styles: dict,
                   stem: Path) -> list[Path]:
    """``panels``: panel title (a timestep) -> run -> ``[(block, value)]``; ``chance`` (dotted grey) and the
    encoder's own accuracy per feature kind (dash-dotted) on every panel."""
    if not panels:
        return []
    fig, axes = _figure("page" if len(panels) > 1 else "column", 2.3, len(panels))
    for ax, (title, series) in zip(axes, panels.items()):
        for run, pts in series.items():
            _line(ax, pts, styles[run], run)
        if chance is not None:
            ax.axhline(chance, color="grey", linestyle=":", label="chance")
        for k, (kind, value) in enumerate(encoder.items()):
            ax.axhline(value, color="black", linestyle="-.", alpha=0.4 + 0.3 * k, label=f"encoder ({kind})")
        ax.set_title(title)
        ax.set_xlabel("block")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylabel(label)
    _legend(fig, axes)
    return save(fig, stem)
