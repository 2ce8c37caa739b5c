"""Gather the finished units of a sweep into one table per analysis, with its cross-checkpoint figures.

``{sweep}/results/{analysis}/``: the analysis' CSV (the library's own writer and columns), the units' bootstrap
replicates merged into one ``replicates.npz``, ``summary.json`` (units done, and every missing unit with its
job's state, error and log path: a partial aggregate says what it lacks; the first unit's ``settings``) and ``figures/`` (the single-run commands' plotting code over all checkpoints; alignment vs training
step and probe accuracy vs block per run). Only units with a ``done.json`` marker are read, so a unit that was
interrupted and recomputed appears once.
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path

from repa_probe.analysis.core.plots import slug
from repa_probe.analysis.core.writers import read_json, write_json
from repa_probe.analysis.correlation.correlate import run_correlate
from repa_probe.errors import ReproError
from repa_probe.reports.bootstrap import FILE as REPLICATES, read_replicates, write_replicates
from repa_probe.sweeps.plan import Job
from repa_probe.sweeps.registry import get_analysis

log = logging.getLogger("repa_probe")
INT_COLUMNS = {"step", "layer", "n", "num_train", "num_test", "num_samples", "steps", "seed"}
STR_COLUMNS = {"checkpoint", "source", "metric", "method"}


def _cell(column: str, text: str):
    if text == "":
        return None
    if column in STR_COLUMNS:
        return text
    try:
        if column in INT_COLUMNS or (column == "timestep" and not any(c in text for c in ".eE")):
            return int(text)
        return float(text)
    except ValueError:
        return text  # e.g. layer = "target"


def read_table(path: Path) -> list[dict]:
    """A result CSV back into typed rows (ints, floats, None for empty cells)."""
    with open(path, newline="") as f:
        return [{k: _cell(k, v) for k, v in row.items()} for row in csv.DictReader(f)]


def _dedupe(rows: list[dict]) -> list[dict]:
    """Identical rows once (e.g. the encoder reference of a probe, computed by every unit)."""
    seen, out = set(), []
    for r in rows:
        key = tuple(sorted((k, str(v)) for k, v in r.items()))
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def _fingerprint(paths) -> list:
    """What a gathered result depends on: each input file with its size and modification time (ns)."""
    out = []
    for p in sorted(Path(q) for q in paths):
        st = p.stat()
        out.append([str(p), st.st_size, st.st_mtime_ns])
    return out


def _unchanged(summary_path: Path, stamp: list, *outputs: Path) -> dict | None:
    """The previous summary when it was made from the same inputs and its outputs still exist, else None."""
    previous = read_json(summary_path)
    if previous and previous.get("stamp") == stamp and all(Path(o).exists() for o in outputs):
        return previous
    return None


def correlate_results(sweep_dir: Path, correlations: list[dict]) -> list[dict]:
    """Run :func:`repa_probe.analysis.correlation.correlate.run_correlate` over every gathered table for each ``{x, y,
    last_only}``, into ``results/correlation/<x>_vs_<y>/``. A correlation that cannot be computed (a quantity
    missing because its jobs failed, fewer than 3 checkpoints) is recorded with its one-line error, never fatal."""
    results = Path(sweep_dir) / "results"
    tables = sorted(results.glob("*/*.csv"))  # the analyses' tables (correlations live one level deeper)
    out, stamp = [], _fingerprint(tables)
    for c in correlations:
        where = results / "correlation" / f"{slug(c['x'])}_vs_{slug(c['y'])}"
        previous = _unchanged(where / "summary.json", stamp + [c.get("last_only", False)], where / "correlation.csv")
        if previous is not None:  # same tables: the bootstrap and permutations are not run again
            out.append(dict(c, dir=str(where), summary=previous, error=None))
            continue
        try:
            summary = run_correlate(tables, c["x"], c["y"], where, last_only=c.get("last_only", False))
            summary["stamp"] = stamp + [c.get("last_only", False)]
            write_json(summary, where / "summary.json")
            out.append(dict(c, dir=str(where), summary=summary, error=None))
        except ReproError as exc:
            log.warning("correlation %s vs %s: %s", c["x"], c["y"], exc)
            out.append(dict(c, dir=str(where), summary=None, error=str(exc)))
    return out


def aggregate(jobs: list[Job], sweep_dir: Path, status: dict) -> dict:
    """Write ``results/<analysis>/`` for every analysis of ``jobs``; ``status``: job key -> {state, log, error}.

    Returns ``{analysis: summary}`` (also written as each ``summary.json``).
    """
    out: dict = {}
    for name in dict.fromkeys(j.analysis for j in jobs):
        spec = get_analysis(name)
        mine = [j for j in jobs if j.analysis == name]
        rows, missing, runs, tables, settings = [], [], {}, [], None
        for job in mine:
            for u in job.units:
                runs[u.ckpt.label] = u.ckpt.run
                table = Path(u.out_dir) / spec.table
                if u.done and table.is_file():
                    rows += read_table(table)
                    tables.append(table)
                    settings = settings or (read_json(Path(u.out_dir) / "summary.json") or {}).get("settings")
                else:
                    st = status.get(job.key, {})
                    missing.append(dict(checkpoint=u.ckpt.label, unit=u.key, job=job.key,
                                        state=st.get("state", "not run"), error=st.get("error"), log=st.get("log")))
        if missing:
            log.warning("%s: partial results, %d unit(s) missing: %s", name, len(missing),
                        ", ".join(m["checkpoint"] for m in missing))
        res = Path(sweep_dir) / "results" / name
        stamp = [_fingerprint(tables), missing, mine[0].options]
        previous = _unchanged(res / "summary.json", stamp, res / spec.table)
        if previous is not None:  # nothing new since the last aggregation: table and figures are current
            out[name] = previous
            continue
        rows = _dedupe(rows)
        res.mkdir(parents=True, exist_ok=True)
        spec.write_table(rows, res / spec.table)
        write_replicates(read_replicates([t.parent / REPLICATES for t in tables]), res / REPLICATES)
        figures = spec.figures(rows, res / "figures", runs, mine[0].options) if rows else []
        summary = dict(analysis=name, options=mine[0].options, units=sum(len(j.units) for j in mine),
                       done=sum(u.done for j in mine for u in j.units), complete=not missing, missing=missing,
                       checkpoints=[dict(label=c, run=runs.get(c)) for c in
                                    sorted({r["checkpoint"] for r in rows if r.get("checkpoint")})], settings=settings,
                       files=dict(csv=spec.table, figures=[str(p.relative_to(res)) for p in figures]), stamp=stamp)
        write_json(summary, res / "summary.json")
        out[name] = summary
    return out
