"""The paper part of a report, built from :class:`~.selection.ReportData`: findings (sentences with intervals,
``findings.csv``), the compact tables (``tables/*.csv``), the paper figures (``figures/*.pdf|png``), and the
writer of ``report.md`` / ``report.html`` / ``report.tex`` + ``tables/*.tex``.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from repa_probe.reports import document as D
from repa_probe.reports import figures as F
from repa_probe.reports import numbers as N
from repa_probe.reports import tables as T
from repa_probe.reports.bootstrap import interval, row_key
from repa_probe.reports.findings import CSV_COLUMNS, correlation_sentence, find
from repa_probe.reports.html import write_html
from repa_probe.reports.latex import write_latex
from repa_probe.reports.markdown import write_markdown
from repa_probe.reports.selection import ReportChoice, ReportData, final_checkpoint, metrics_of, nearest_time, pick


@dataclass
class PaperParts:
    findings: list = field(default_factory=list)  # blocks
    tables: list = field(default_factory=list)
    figures: list = field(default_factory=list)
    files: list = field(default_factory=list)  # written CSVs


def build_paper(choice: ReportChoice, data: ReportData, root: Path, correlations: list[dict] = (),
                chance: Optional[float] = None) -> PaperParts:
    """Findings, tables and figures of a study under ``root`` (``findings.csv``, ``tables/``, ``figures/``)."""
    root, parts = Path(root), PaperParts()
    found = find(choice, data)
    sentences = [f.sentence() for f in found] + [s for s in map(correlation_sentence, correlations) if s]
    resolved = sum(f.resolved is True for f in found)
    parts.findings = [D.para(f"{len(found)} comparisons at each run's final checkpoint ({resolved} resolved: "
                             "their bootstrap 95% interval excludes 0), then the correlations across checkpoints."),
                      D.bullets(sentences or ["No comparison: the study has a single run or no results."])]
    parts.files.append(T.write_rows([f.csv_row() for f in found], root / "findings.csv", CSV_COLUMNS))
    cells = T.summary_cells(choice, data)
    parts.files.append(T.write_rows(T.summary_csv_rows(cells), root / "tables" / "summary.csv"))
    times = sorted({N.time_label(s.row["timestep"]) for e in cells for s in e["cells"].values()
                    if s.row.get("timestep") is not None})
    parts.tables = [D.table(T.summary_rows(cells), "summary",
                            f"Each run at its final checkpoint, at t = {' / '.join(times) or '-'} (t = 0 clean, 1 "
                            "noise) and the block its comparison uses. Raw values with intervals: "
                            "`tables/summary.csv`.")]
    if found:
        parts.tables.append(D.table(T.findings_rows(found), "comparisons",
                                    "Differences A - B with paired bootstrap 95% intervals (`findings.csv`)."))
    parts.figures = cached_figures(choice, data, root / "figures", correlations, chance)
    return parts


def _fingerprint(choice: ReportChoice, data: ReportData, correlations, chance) -> str:
    """A hash of everything the figures are drawn from (rows, replicates, runs, choice, correlations)."""
    h = hashlib.sha256(json.dumps([dataclasses.asdict(choice), data.tables, data.run_of, data.repa_block, data.runs,
                                   [(c.get("x"), c.get("y"), c.get("dir"), c.get("error"), (c.get("summary") or {})
                                     .get("pearson")) for c in correlations], chance], default=str,
                                  sort_keys=True).encode())
    for name in sorted(data.replicates):
        for key in sorted(data.replicates[name]):
            h.update(key.encode() + np.ascontiguousarray(data.replicates[name][key][0], np.float32).tobytes())
    return h.hexdigest()


def cached_figures(choice: ReportChoice, data: ReportData, out: Path, correlations, chance) -> list[tuple]:
    """:func:`paper_figures`, or the figure blocks of the previous report when it was drawn from the same data
    (``figures/figures.json``: a rerun of a finished study does not redraw)."""
    index, stamp = Path(out) / "figures.json", _fingerprint(choice, data, correlations, chance)
    if index.is_file():
        previous = json.loads(index.read_text())
        blocks = [D.figure(Path(out) / png, caption, width) for png, caption, width in previous["figures"]]
        if previous.get("stamp") == stamp and all(b[1].is_file() for b in blocks):
            return blocks
    blocks = paper_figures(choice, data, out, correlations, chance)
    index.parent.mkdir(parents=True, exist_ok=True)
    index.write_text(json.dumps(dict(stamp=stamp, figures=[[b[1].name, b[2], b[3]["width"]] for b in blocks])))
    return blocks


def _grids(rows: list[dict], data: ReportData, metric: str) -> dict:
    out = {}
    for run in data.runs:
        ckpt = final_checkpoint(rows, data, run)
        grid = {(r["layer"], r["timestep"]): r["value"] for r in rows if r["checkpoint"] == ckpt
                and r["metric"] == metric and r.get("layer") not in (None, "target")}
        if grid:
            out[run] = grid
    return out


def _series(rows: list[dict], data: ReportData, analysis: str, metric: str, block, t) -> dict:
    """run -> [(step, value, low, high)] at the run's block and ``t`` over its checkpoints."""
    out = {}
    reps = data.replicates.get(analysis, {})
    for run in data.runs:
        pts = []
        for ckpt in dict.fromkeys(r["checkpoint"] for r in rows if data.run_of.get(r["checkpoint"]) == run):
            r = pick(rows, ckpt, metric, block(run) if block else None, t)
            if r is not None and r.get("step") is not None:
                rr, scale = reps.get(row_key(r), (None, 1.0))
                pts.append((r["step"], r["value"], *(interval(r["value"], rr, scale) if rr is not None
                                                      else (None, None))))
        if pts:
            out[run] = pts
    return out


def paper_figures(choice: ReportChoice, data: ReportData, out: Path, correlations, chance) -> list[tuple]:
    """Heatmaps per alignment metric, metrics vs step (FD on a twin axis), correlation scatters, probes vs block."""
    styles, blocks = F.run_style(data.runs), []
    align, fid, probe = (data.tables.get(k, []) for k in ("alignment", "fid", "probe"))
    for metric in metrics_of(align):
        paths = F.heatmaps(_grids(align, data, metric), N.metric_label(metric), out / f"heatmap-{metric}")
        blocks += [D.figure(p, f"{N.metric_label(metric)} of every block (y) at every noise level (x), final "
                           "checkpoint of each run, one colour scale.") for p in paths if p.suffix == ".png"]
    if align:
        blocks += _step_blocks(choice, data, align, fid, styles, out)
    for c in correlations:
        blocks += _scatter_block(c, styles, out)
    if probe:
        blocks += _probe_blocks(probe, data, styles, chance, out)
    return blocks


def _step_blocks(choice: ReportChoice, data: ReportData, align: list, fid: list, styles: dict, out: Path) -> list:
    """The first alignment metric with FD on a twin axis (column width), the other metrics vs step (page)."""
    t = nearest_time(align, choice.timestep)
    block = lambda run: T.run_block(choice, data, run)  # noqa: E731
    metrics = metrics_of(align)
    fd_metric = next(iter(metrics_of(fid)), None)
    fd = {run: [p[:2] for p in pts] for run, pts in _series(fid, data, "fid", fd_metric, None, None).items()} \
        if fd_metric else {}
    where = f"at each run's block, t = {N.time_label(t)}, against training step (shaded: 95% interval)"
    first = F.metric_vs_step({N.metric_label(metrics[0]): _series(align, data, "alignment", metrics[0], block, t)},
                             styles, out / f"{metrics[0]}-vs-step", fd, N.metric_label(fd_metric) if fd else None)
    out_blocks = [D.figure(p, f"{N.metric_label(metrics[0])} {where}" + (
        f"; {N.metric_label(fd_metric)} dashed on the right axis." if fd else "."), "column")
        for p in first if p.suffix == ".png"]
    if len(metrics) > 1:
        rest = F.metric_vs_step({N.metric_label(m): _series(align, data, "alignment", m, block, t)
                                 for m in metrics[1:]}, styles, out / "spatial-vs-step")
        out_blocks += [D.figure(p, f"{', '.join(N.metric_label(m) for m in metrics[1:])} {where}.")
                       for p in rest if p.suffix == ".png"]
    return out_blocks


def _scatter_block(c: dict, styles: dict, out: Path) -> list[tuple]:
    path = Path(c["dir"]) / "correlation.csv"
    if c.get("error") or not path.is_file():
        return []
    with open(path, newline="") as f:
        points = [dict(run=r["run"], step=r["step"], x=float(r["x"]), y=float(r["y"])) for r in csv.DictReader(f)]
    p = c["summary"]["pearson"]
    title = f"Pearson r = {N.fmt_interval(p.get('r'), p.get('ci_low'), p.get('ci_high'))}"
    stem = out / f"scatter-{D.anchor(c['x'])}-vs-{D.anchor(c['y'])}"
    paths = F.scatter(points, c["x"], c["y"], title, styles, stem)
    return [D.figure(q, f"`{c['x']}` vs `{c['y']}`, one point per checkpoint (step annotated).", "column")
            for q in paths if q.suffix == ".png"]


def _probe_blocks(rows: list[dict], data: ReportData, styles: dict, chance, out: Path) -> list[tuple]:
    metric = "top1" if any(r["metric"] == "top1" for r in rows) else metrics_of(rows)[0]
    times = sorted({r["timestep"] for r in rows if r.get("source") == "model"}, key=str)
    panels = {}
    for t in times:
        series = {}
        for run in data.runs:
            ckpt = final_checkpoint([r for r in rows if r.get("source") == "model"], data, run)
            pts = [(r["layer"], r["value"]) for r in rows if r["checkpoint"] == ckpt and r["metric"] == metric
                   and r["timestep"] == t]
            if pts:
                series[run] = pts
        panels[f"t = {N.time_label(t)}"] = series
    encoder = {r["source"].split(":", 1)[1]: r["value"] for r in rows
               if str(r.get("source", "")).startswith("encoder:") and r["metric"] == metric}
    paths = F.probe_vs_block(panels, chance if metric == "top1" else None, encoder,
                             f"linear probe {N.metric_label(metric)}", styles, out / f"probe-{metric}-vs-block")
    return [D.figure(p, f"Linear-probe {N.metric_label(metric)} of each block, final checkpoint of each run; "
                        "dotted: chance" + (", dash-dotted: the encoder's own features." if encoder else "."),
                     "page" if len(panels) > 1 else "column") for p in paths if p.suffix == ".png"]


def write_report(blocks: list[tuple], paper_blocks: list[tuple], root: Path) -> list[Path]:
    """``report.md``, ``report.html`` (from ``blocks``) and ``report.tex`` + ``tables/*.tex`` (from
    ``paper_blocks``: the fragment to paste into a paper) under ``root``."""
    root = Path(root)
    return [write_markdown(blocks, root / "report.md"), write_html(blocks, root / "report.html"),
            *write_latex(paper_blocks, root)]
