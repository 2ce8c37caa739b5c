"""Compact tables: runs as rows, metrics as columns, at the report's block / timestep choice; the comparisons
as a table; and their CSVs (raw values beside the rounded ones the report prints).

A cell is the value a finding's sentence quotes for the same run (:func:`run_block` gives each run the block
of its comparison), rounded by :mod:`.numbers`.
"""
from __future__ import annotations

import csv
from pathlib import Path

from repa_probe.reports import numbers as N
from repa_probe.reports.findings import Finding, side, where_of
from repa_probe.reports.selection import (ReportChoice, ReportData, block_for, comparisons, final_checkpoint,
                                          metrics_of, pick)


def run_block(choice: ReportChoice, data: ReportData, run: str):
    """The block a run is shown at: that of its first comparison, else its REPA block, else its best."""
    for pair in comparisons(choice, data):
        if run in pair:
            return block_for(choice, data, pair)
    return block_for(choice, data, (run,))


def summary_cells(choice: ReportChoice, data: ReportData) -> list[dict]:
    """``[{run, step, block, cells: {column: Side}}]``: each run's final checkpoint, every analysis' metrics."""
    out = []
    for run in data.runs:
        entry = dict(run=run, step=None, block=None, cells={})
        for analysis, rows in data.tables.items():
            block, t = where_of(choice, data, rows, (run,))
            if block is not None:
                block = run_block(choice, data, run)
            ckpt = final_checkpoint(rows, data, run)
            for metric in metrics_of(rows) if ckpt else []:
                row = pick(rows, ckpt, metric, block, t)
                if row is None:
                    continue
                entry["cells"][N.metric_label(metric)] = side(data, analysis, run, row)
                entry["step"] = entry["step"] or row.get("step")
                if row.get("layer") is not None and entry["block"] is None:
                    entry["block"] = row["layer"]
        out.append(entry)
    return out


def summary_rows(cells: list[dict]) -> list[dict]:
    """Rounded table rows (run, step, block, one column per metric)."""
    cols = list(dict.fromkeys(c for e in cells for c in e["cells"]))
    return [dict(run=e["run"], step=e["step"], block=e["block"] if e["block"] is not None else "",
                 **{c: e["cells"][c].text if c in e["cells"] else "" for c in cols}) for e in cells]


def summary_csv_rows(cells: list[dict]) -> list[dict]:
    """Raw values: one row per run x metric column with its interval."""
    return [dict(run=e["run"], step=e["step"], block=e["block"], column=c, checkpoint=s.row["checkpoint"],
                 value=s.row["value"], ci_low=s.ci[0], ci_high=s.ci[1]) for e in cells for c, s in e["cells"].items()]


def findings_rows(findings: list[Finding]) -> list[dict]:
    """The comparisons as a table (rounded as in their sentences)."""
    return [dict(comparison=f"{f.a.run} vs {f.b.run}", metric=N.metric_label(f.metric), where=f.where(),
                 a=f.a.text, b=f.b.text, difference=f.diff_text(),
                 resolved={True: "yes", False: "unresolved", None: "no interval"}[f.resolved]) for f in findings]


def write_rows(rows: list[dict], path: Path, columns=None) -> Path:
    """Rows -> CSV (None as empty cells)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = list(columns or (rows[0] if rows else []))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if r.get(k) is None else r.get(k) for k in cols})
    return path
