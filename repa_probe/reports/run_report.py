"""The short ``report.md`` a single-run command writes next to its CSV: the headline numbers (with their 95%
intervals where the analysis stored bootstrap replicates) and links to the files.

* alignment: for each checkpoint and metric, the best block at the plot timestep; the target encoder's own
  spatial values;
* probe / segment: for each checkpoint and timestep, the best block; the encoder's own accuracy;
* fid: every metric of every checkpoint;
* correlate: Pearson and Spearman with intervals and permutation p-values;
* any other analysis of the run skeleton: its first rows.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from repa_probe.reports import document as D
from repa_probe.reports import numbers as N
from repa_probe.reports.bootstrap import interval, row_key
from repa_probe.reports.markdown import write_markdown

MAX_ROWS = 20


def _value(row: dict, replicates: dict) -> str:
    reps, scale = replicates.get(row_key(row), (None, 1.0))
    lo, hi = interval(row["value"], reps, scale) if reps is not None else (row.get("ci_low"), row.get("ci_high"))
    return N.fmt_interval(row["value"], lo, hi)


def _best(rows: list[dict], keys: tuple) -> list[dict]:
    """Per ``keys`` group, the row with the highest value."""
    best: dict = {}
    for r in rows:
        if not N.finite(r.get("value")):
            continue
        k = tuple(r.get(c) for c in keys)
        if k not in best or r["value"] > best[k]["value"]:
            best[k] = r
    return list(best.values())


def _layered(rows: list[dict], replicates: dict, t) -> list[tuple]:
    """Best block per checkpoint x metric (x timestep when ``t`` is None) and reference rows."""
    model = [r for r in rows if r.get("source", "model") == "model" and r.get("layer") not in (None, "target")
             and (t is None or r.get("timestep") == t)]
    best = _best(model, ("checkpoint", "metric", "timestep"))
    table = [dict(checkpoint=r["checkpoint"], step=r.get("step"), t=N.time_label(r["timestep"]),
                  metric=N.metric_label(r["metric"]), block=r["layer"], value=_value(r, replicates)) for r in best]
    refs = [r for r in rows if r.get("layer") == "target" or str(r.get("source", "")).startswith("encoder:")]
    refs = list({(r.get("source"), r["metric"]): r for r in refs if N.finite(r.get("value"))}.values())
    out = [D.table(table)] if table else []
    if refs:
        out += [D.para("Reference (the target encoder's own features):"),
                D.table([dict(features=r.get("source") or "target patch tokens", metric=N.metric_label(r["metric"]),
                              value=_value(r, replicates)) for r in refs])]
    return out


def headline_blocks(analysis: str, rows: list[dict], replicates: dict, summary: dict) -> list[tuple]:
    """The headline section of one analysis' report."""
    if analysis == "alignment":
        t = (summary.get("settings") or {}).get("plot_timestep")
        return [D.para(f"Best block of each checkpoint at t = {N.time_label(t)} (t = 0 clean, 1 noise):")] + \
            _layered(rows, replicates, t)
    if analysis in ("probe", "segment"):
        return [D.para("Best block of each checkpoint at each timestep (t = 0 clean, 1 noise):")] + \
            _layered(rows, replicates, None)
    if analysis == "fid":
        return [D.table([dict(checkpoint=r["checkpoint"], step=r.get("step"), metric=N.metric_label(r["metric"]),
                              value=_value(r, replicates), samples=r.get("num_samples")) for r in rows])]
    if analysis == "correlate":
        return [D.table([dict(statistic=k, n=summary.get("n"), r=N.fmt_interval(v.get("r"), v.get("ci_low"),
                                                                               v.get("ci_high")),
                              p_perm=N.fmt(v.get("p_perm"), 3))
                         for k, v in summary.items() if k in ("pearson", "spearman") and isinstance(v, dict)])]
    shown = [dict(r, value=_value(r, replicates)) for r in rows[:MAX_ROWS] if N.finite(r.get("value"))]
    more = [D.para(f"First {MAX_ROWS} of {len(rows)} rows: the CSV has them all.")] if len(rows) > MAX_ROWS else []
    return ([D.table(shown)] if shown else []) + more


def write_run_report(out_dir, analysis: str, rows: list[dict], replicates: Optional[dict] = None,
                     summary: Optional[dict] = None, files: Optional[list] = None) -> Path:
    """``out_dir/report.md`` for one analysis run; ``files``: paths to link (CSV, JSON, figures)."""
    out = Path(out_dir)
    summary = summary or {}
    title = {"correlate": f"Correlation: {summary.get('x')} vs {summary.get('y')}"}.get(analysis, f"{analysis} report")
    blocks = [D.heading(title, 1)] + headline_blocks(analysis, rows, replicates or {}, summary)
    links = [f"`{os.path.relpath(p, out)}`" for p in files or [] if Path(p).exists()]
    if links:
        blocks += [D.heading("Files"), D.bullets(links)]
    return write_markdown(blocks, out / "report.md")
