"""The study report: findings first, compact tables, the paper figures, then what was run and an appendix.

Written under the study directory: ``report.md`` (figures linked), ``report.html`` (one self-contained file,
figures inline, a table of contents), ``report.tex`` + ``tables/*.tex`` (a LaTeX fragment for a paper),
``findings.csv`` and ``tables/*.csv`` (the numbers the sentences and tables print), ``figures/`` (PDF + PNG).
The content comes from :mod:`repa_probe.reports`; this module reads the study record and the sweep's gathered
results into a :class:`~repa_probe.reports.selection.ReportData` and adds the study's own sections (runs,
analyses and options, units done or missing, correlations, per-checkpoint tables and per-run figures).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from repa_probe.reports import document as D
from repa_probe.reports import numbers as N
from repa_probe.reports.bootstrap import FILE as REPLICATES, read_replicates
from repa_probe.reports.paper import build_paper, write_report as write_files
from repa_probe.reports.selection import ReportChoice, ReportData
from repa_probe.reports.tables import write_rows
from repa_probe.sweeps.aggregate import read_table
from repa_probe.sweeps.registry import get_analysis

RUN_COLUMNS = ("model", "depth", "hidden_size", "steps", "batch_size", "proj_coeff", "encoder_depth", "encoder",
               "data", "resolution", "trained")


def best_rows(rows: list[dict]) -> list[dict]:
    """Per (checkpoint, timestep, metric): the block with the highest value; reference rows (no layer) as is."""
    best: dict = {}
    for r in rows:
        if not N.finite(r.get("value")):
            continue
        key = (r.get("checkpoint"), r.get("source"), r.get("timestep"), r.get("metric"))
        if key not in best or (r.get("layer") is not None and r["value"] > best[key]["value"]):
            best[key] = r
    out = [dict(checkpoint=r.get("checkpoint"), step=r.get("step"), t=r.get("timestep"), metric=r.get("metric"),
                block=r.get("layer") if r.get("layer") is not None else "-", value=r["value"])
           for r in best.values()]
    return sorted(out, key=lambda r: (str(r["metric"]), str(r["t"]), str(r["checkpoint"])))


def report_data(record: dict) -> ReportData:
    """The gathered tables and replicates of a study record, with each checkpoint's run and each run's block."""
    res = Path(record["sweep"]["dir"]) / "results"
    runs = list(record["runs"])
    tables, replicates = {}, {}
    for name, summary in record["sweep"]["results"].items():
        path = res / name / summary["files"]["csv"]
        tables[name] = read_table(path) if path.is_file() else []
        replicates[name] = read_replicates([res / name / REPLICATES])
    run_of = {c["label"]: c["run"] for s in record["sweep"]["results"].values() for c in s.get("checkpoints", [])
              if isinstance(c, dict) and c.get("run") in runs}  # the aggregates' label -> run
    repa_block = {k: (v.get("encoder_depth") if (v.get("proj_coeff") or 0) > 0 else None)
                  for k, v in record["runs"].items()}
    return ReportData(tables, replicates, run_of, repa_block, runs)


def _chance(record: dict):
    """Chance top-1 of the linear probe (1 / classes), from the probe aggregate's unit settings."""
    settings = (record["sweep"]["results"].get("probe") or {}).get("settings") or {}
    k = settings.get("num_classes")
    return 1.0 / k if k else None


def _header(record: dict) -> list[tuple]:
    runs = ", ".join(f"`{k}`" for k in record["runs"])
    return [D.heading(record["title"], 1),
            D.para(f"Runs {runs}; finished {record['finished']} (training {record['seconds']['training']} s, "
                   f"analyses {record['seconds']['analyses']} s). Time: t = 0 clean data, t = 1 pure noise. "
                   f"Command: `{record['command'] or 'run_study'}`.")]


def _what_was_run(record: dict) -> list[tuple]:
    cfg = record["config"]
    runs = [dict(run=k, **{c: v.get(c) for c in RUN_COLUMNS}) for k, v in record["runs"].items()]
    return [D.heading("What was run"), D.para("Training runs (`repa.proj_coeff = 0` is the baseline without REPA):"),
            D.table(runs, "runs"),
            D.para(f"Checkpoint steps analysed: {cfg['steps'] or 'all'}. Launcher: `{cfg['launcher']['kind']}`."),
            D.table([dict(analysis=k, options=f"`{json.dumps(v)}`") for k, v in cfg["analyses"].items()])]


def _appendix(root: Path, record: dict) -> list[tuple]:
    """Per analysis: units done / missing, the full CSV, the best block of every checkpoint, per-run figures."""
    sweep_dir = Path(record["sweep"]["dir"])
    b: list[tuple] = [D.heading("Appendix: every checkpoint and run")]
    for name, summary in record["sweep"]["results"].items():
        res = sweep_dir / "results" / name
        status = "complete" if summary["complete"] else f"PARTIAL: {len(summary['missing'])} unit(s) missing"
        csv_path = res / summary["files"]["csv"]
        rows = read_table(csv_path) if csv_path.is_file() else []
        text = (f"{summary['done']}/{summary['units']} units ({status}). Full table: "
                f"`{os.path.relpath(csv_path, root)}`.")
        if rows and "layer" in rows[0]:
            best = write_rows(best_rows(rows), root / "tables" / f"best-{name}.csv")
            text += f" Best block of every checkpoint, timestep and metric: `{os.path.relpath(best, root)}`."
        b += [D.heading(name, 3), D.para(text)]
        if summary["missing"]:
            b.append(D.table([dict(checkpoint=m["checkpoint"], state=m["state"], error=m["error"], log=m["log"])
                              for m in summary["missing"]]))
        for pattern in get_analysis(name).report_figures:
            b += [D.figure(png, f"{name}: {png.stem}") for png in sorted((res / "figures").glob(pattern))]
    return b


def _correlations(correlations: list[dict]) -> list[tuple]:
    if not correlations:
        return []
    rows = []
    for c in correlations:
        s = c.get("summary") or {}
        for stat in ("pearson", "spearman"):
            v = s.get(stat) or {}
            rows.append(dict(x=f"`{c['x']}`", y=f"`{c['y']}`", statistic=stat, n=s.get("n"),
                             r=N.fmt_interval(v.get("r"), v.get("ci_low"), v.get("ci_high")),
                             p_perm=N.fmt(v.get("p_perm"), 3), error=c.get("error") or ""))
    return [D.heading("Correlations across checkpoints"),
            D.para("Pearson and Spearman over checkpoints with bootstrap 95% intervals and permutation p-values "
                   "(checkpoints of one run are not independent: with many per run the intervals are optimistic)."),
            D.table(rows, "correlations")]


def write_report(root: Path, record: dict) -> list[Path]:
    """``root/report.{md,html,tex}``, ``root/tables/``, ``root/findings.csv`` and ``root/figures/`` from a study
    record (see :func:`repa_probe.sweeps.study.run_study`); returns the report files."""
    root = Path(root)
    choice = ReportChoice(**(record["config"].get("report") or {}))
    correlations = record["sweep"].get("correlations", [])
    paper = build_paper(choice, report_data(record), root, correlations, _chance(record))
    findings = [D.heading("Findings")] + paper.findings
    tables = [D.heading("Results at a glance")] + paper.tables
    figures = [D.heading("Figures")] + paper.figures
    blocks = _header(record) + findings + tables + figures + _correlations(correlations) + _what_was_run(record)
    if record["sweep"]["failed"]:
        blocks += [D.heading("Failed jobs"), D.table(record["sweep"]["failed"])]
    blocks += _appendix(root, record)
    return write_files(blocks, _header(record)[:1] + findings + tables + figures, root)
