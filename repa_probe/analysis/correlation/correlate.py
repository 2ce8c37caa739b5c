"""Relate a representation property to generation quality across checkpoints (``python -m analysis.correlate``).

Reads result tables (``alignment.csv``, ``probe.csv`` / ``segment.csv``, ``fid.csv``; files, directories
searched recursively, or glob patterns; one or more runs), joins them per checkpoint label, picks one value per
checkpoint for ``x`` and ``y`` and reports Pearson's r and Spearman's ρ with percentile-bootstrap 95%
intervals over checkpoints and two-sided permutation p-values.

Quantity syntax: ``METRIC[@LAYER][,t=T]`` (``T`` a time in [0, 1] or ``step:N``, as in the tables; times are read
by :mod:`repa_probe.timesteps`, so DiT tables written ``step:250`` join like any other)

* ``cknna@block8,t=0.5`` (or ``@8``): block 8 at t = 0.5; ``cknna@best,t=0.5``: the best block per checkpoint;
* ``lds@target``: the target encoder's value (spatial rows of ``alignment.csv``; no timestep);
* ``fid_inception``, ``fd_dinov2_vitl14``: FID-table metrics (no layer, no timestep).

Tables of one kind made with different settings (N, seed, encoder, timesteps: ``options.json`` /
``summary.json`` beside them) are refused when they share a checkpoint, and for N and seed always
(:func:`check_settings`); a checkpoint with two different values of one quantity is refused for every
layer choice (``@blockN``, ``@best``, ``@target``), before the best block is picked.

A layer or timestep may be left out when the tables have only one. When tables have different timesteps,
only the shared ones are offered and the checkpoints of a table without the requested one are left out
with a warning. The run of a checkpoint is the part of its label before ``/`` (our labels are
``run/0000100``), else the label itself. Checkpoints of one run are not independent samples: with many
checkpoints per run the intervals are optimistic (``last_only`` keeps one point per run, iREPA's figure).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from repa_probe.analysis.core.paths import expand_paths
from repa_probe.analysis.core.plots import slug
from repa_probe.analysis.core.writers import begin_outputs, end_outputs, read_json, write_json, write_text
from repa_probe.analysis.correlation.plots import scatter, versus_step
from repa_probe.analysis.errors import AnalysisInputError
from repa_probe.analysis.metrics.correlation import MIN_POINTS, correlation
from repa_probe.reports.run_report import write_run_report
from repa_probe.timesteps import Step, TimeError, UserTime, as_float, label, parse_time, parse_times

__all__ = ["AnalysisInputError", "Quantity", "parse_quantity", "find_tables", "load_tables", "select", "join",
           "correlation", "correlate_table", "run_correlate", "TABLE_NAMES"]

log = logging.getLogger("repa_probe")

TABLE_NAMES = ("alignment.csv", "probe.csv", "segment.csv", "fid.csv")
MIN_CHECKPOINTS = MIN_POINTS  # a correlation needs at least this many checkpoints with both values
SETTING_KEYS = ("num_samples", "num_train", "num_test", "seed", "encoder", "timesteps")  # what makes a table's values
COMPARABLE_KEYS = ("num_samples", "num_train", "num_test", "seed")  # values of different checkpoints need equal ones
_SPEC = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(?:@\s*([A-Za-z0-9_]+))?\s*(?:,\s*t\s*=\s*([A-Za-z0-9:.+\-]+))?\s*$")


@dataclasses.dataclass(frozen=True)
class Quantity:
    """A per-checkpoint quantity: ``metric``, ``layer`` (None, an int block, ``"best"`` or ``"target"``), ``t``."""

    metric: str
    layer: int | str | None = None
    t: UserTime | None = None

    def __str__(self) -> str:
        layer = "" if self.layer is None else f"@block{self.layer}" if isinstance(self.layer, int) else f"@{self.layer}"
        return f"{self.metric}{layer}" + ("" if self.t is None else f",t={_tstr(self.t)}")


def _time_key(value) -> UserTime:
    """A time as the key tables are joined on (:func:`repa_probe.timesteps.parse_time`: ``0.5`` or ``Step(250)``;
    floats rounded to 1e-6 so that a CSV round trip keeps them equal)."""
    t = parse_time(value)
    return t if isinstance(t, Step) else round(t, 6)


def _tstr(t: UserTime) -> str:
    return str(t) if isinstance(t, Step) else f"{t:g}"


def parse_quantity(text: str, what: str = "x") -> Quantity:
    """``"cknna@block8,t=0.5"`` -> ``Quantity("cknna", 8, 0.5)`` (see the module docstring)."""
    m = _SPEC.match(str(text))
    if not m:
        raise AnalysisInputError(f"--{what} {text!r}: expected METRIC[@blockN|@best|@target][,t=T], "
                             "e.g. cknna@block8,t=0.5")
    metric, layer, t = m.groups()
    if layer is not None:
        low = layer.lower()
        if low in ("best", "target"):
            layer = low
        elif re.fullmatch(r"(block)?\d+", low):
            layer = int(low.removeprefix("block"))
        else:
            raise AnalysisInputError(f"--{what} {text!r}: layer must be blockN, N, best or target, got {layer!r}")
    try:
        t = None if t is None else _time_key(t)
    except TimeError as exc:
        raise AnalysisInputError(f"--{what} {text!r}: {exc}") from None
    return Quantity(metric, layer, t)


# ----------------------------------------------------------------------------------------------- tables
def find_tables(items: Sequence) -> list[Path]:
    """CSV files from files, directories (searched recursively for :data:`TABLE_NAMES`) and glob patterns; a
    table reached twice is read once."""
    out = expand_paths(items, "--tables", lambda d: sorted(q for name in TABLE_NAMES for q in d.rglob(name)),
                       ", ".join(TABLE_NAMES), patterns=True)
    return list(dict.fromkeys(p.resolve() for p in out))


def _read(path: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype={"checkpoint": str, "layer": str, "metric": str})
    except (OSError, ValueError) as exc:
        raise AnalysisInputError(f"{path}: not a readable CSV ({exc})") from None
    missing = [c for c in ("checkpoint", "metric", "value") if c not in df.columns]
    if missing:
        raise AnalysisInputError(f"{path}: not a result table (no {', '.join(missing)} column; "
                             f"has {', '.join(df.columns)})")
    if "source" in df.columns:  # probe tables: the encoder's own reference rows are not per checkpoint
        df = df[df["source"].fillna("model") == "model"]
    layer = df["layer"] if "layer" in df.columns else pd.Series("", index=df.index)
    out = pd.DataFrame({
        "file": str(path), "checkpoint": df["checkpoint"].astype(str),
        "step": pd.to_numeric(df.get("step", pd.Series(np.nan, index=df.index)), errors="coerce"),
        "layer": layer.fillna("").astype(str).str.replace(r"\.0$", "", regex=True),
        "timestep": _times(df, path),
        "metric": df["metric"].astype(str), "value": pd.to_numeric(df["value"], errors="coerce")})
    out["run"] = _runs(path, df, out["checkpoint"])
    return out


def _times(df: pd.DataFrame, path: Path) -> list:
    """The table's timestep column read by the time owner (``0.5``, ``step:250``; None where empty)."""
    try:
        return [None if pd.isna(v) or str(v).strip() == "" else _time_key(v)
                for v in df.get("timestep", pd.Series(None, index=df.index, dtype=object))]
    except TimeError as exc:
        raise AnalysisInputError(f"{path}: column timestep: {exc}") from None


def _runs(path: Path, df: pd.DataFrame, checkpoints: pd.Series) -> list[str]:
    """The run of each row: the table's ``run`` column, else the ``run`` of its checkpoint in the
    ``summary.json`` beside the table (written by every analysis), else the checkpoint itself (a run of one)."""
    if "run" in df.columns:
        given = df["run"].where(df["run"].notna(), None).tolist()
    else:
        try:
            described = json.loads((Path(path).parent / "summary.json").read_text()).get("checkpoints") or []
        except (OSError, ValueError, AttributeError):
            described = []
        by_label = {c.get("label"): c.get("run") for c in described if isinstance(c, dict)}
        given = [by_label.get(c) for c in checkpoints]
    return [str(r) if r not in (None, "") else c for r, c in zip(given, checkpoints)]


def load_tables(items: Sequence) -> pd.DataFrame:
    """Every row of every table as one long frame: file, run, checkpoint, step, layer (str: '' / '8' /
    'target'), timestep (``0.5`` or ``Step(250)``; None without), metric, value."""
    return pd.concat([_read(p) for p in find_tables(items)], ignore_index=True)


# ---------------------------------------------------------------------------------------- table settings
def table_settings(path: Path) -> dict:
    """The :data:`SETTING_KEYS` a table was made with, from the ``options.json`` / ``summary.json`` beside it
    (the resolved N and encoder when the summary has them); ``{}`` for a table without them."""
    summary = read_json(path.parent / "summary.json", {}) or {}
    options = read_json(path.parent / "options.json") or summary.get("options") or {}
    out = {k: options[k] for k in SETTING_KEYS if options.get(k) is not None}
    settings = summary.get("settings") or {}
    if settings.get("num_samples") is not None:
        out["num_samples"] = settings["num_samples"]
    encoder = (summary.get("encoder") or {}).get("name") or settings.get("encoder_name")
    if encoder:
        out["encoder"] = encoder
    if "timesteps" in out:
        try:
            out["timesteps"] = [label(t) for t in parse_times(out["timesteps"])]
        except (TimeError, TypeError, ValueError):
            pass
    return out


def check_settings(df: pd.DataFrame) -> None:
    """Refuse tables of one kind (one file name, e.g. two ``alignment.csv``) made with different settings
    before any quantity is formed: tables that share a checkpoint must agree on every :data:`SETTING_KEYS`
    (else a value, or the best block, would be picked from either); tables of different checkpoints on
    :data:`COMPARABLE_KEYS` (values at different N or noise seeds are not comparable). Different timesteps
    of different checkpoints join on the shared ones; different target encoders of different runs are what
    iREPA's figure compares."""
    if "file" not in df.columns:  # an in-memory frame: no tables to compare
        return
    checkpoints = {f: set(g) for f, g in df.groupby("file")["checkpoint"]}
    settings = {f: table_settings(Path(f)) for f in checkpoints}
    files = sorted(checkpoints)
    for i, a in enumerate(files):
        for b in files[i + 1:]:
            if Path(a).name != Path(b).name:
                continue
            sa, sb, shared = settings[a], settings[b], checkpoints[a] & checkpoints[b]
            keys = [k for k in (SETTING_KEYS if shared else COMPARABLE_KEYS) if k in sa and k in sb and sa[k] != sb[k]]
            if keys:
                diff = "; ".join(f"{k} {sa[k]} vs {sb[k]}" for k in keys)
                what = f"share checkpoint {sorted(shared)[0]} but" if shared else "hold different checkpoints"
                raise AnalysisInputError(f"tables {a} and {b} {what} were made with different settings ({diff}): pass "
                                     "only the tables of one setting")


# ------------------------------------------------------------------------------------------- selection
def _available(df: pd.DataFrame) -> str:
    """What the tables hold, as quantities a user can type (compressed)."""
    parts = []
    for metric, g in df.groupby("metric", sort=True):
        layers = sorted({v for v in g["layer"] if v not in ("", "target")}, key=lambda v: (not v.isdigit(), v.zfill(9)))
        ts = sorted(set(g["timestep"].dropna()), key=as_float)
        desc = metric
        if layers:
            desc += f"@block{layers[0]}..{layers[-1]}|best" if len(layers) > 1 else f"@block{layers[0]}"
        if ts:
            desc += ",t=" + "|".join(_tstr(v) for v in ts)
        if (g["layer"] == "target").any():
            desc += f"; {metric}@target"
        parts.append(desc)
    return "; ".join(parts)


def _pick_timestep(rows: pd.DataFrame, q: Quantity, warnings: list) -> pd.DataFrame:
    timed = rows["timestep"].notna()
    if not timed.any():
        return rows
    per_file = {f: set(g["timestep"].dropna()) for f, g in rows[timed].groupby("file")}
    shared = set.intersection(*per_file.values())
    if len({frozenset(v) for v in per_file.values()}) > 1:
        rest = set.union(*per_file.values()) - shared
        warnings.append(f"{q.metric}: the tables have different timesteps; shared: "
                        f"{_tlist(shared) or 'none'}; not in every table: {_tlist(rest)}")
    t = q.t
    if t is None:
        if len(shared) != 1:
            raise AnalysisInputError(f"{q}: give a timestep (,t=T); shared by all tables: {_tlist(shared) or 'none'}")
        t = next(iter(shared))
    lacking = [f for f, ts in per_file.items() if t not in ts]
    if len(lacking) == len(per_file):
        raise AnalysisInputError(f"{q}: no table has t={_tstr(t)}; available: {_available(rows)}")
    if lacking:
        warnings.append(f"{q}: t={_tstr(t)} is missing from {', '.join(lacking)}: their checkpoints are left out")
    return rows[rows["timestep"].map(lambda v: v == t)]


def _tlist(times) -> str:
    return ", ".join(_tstr(v) for v in sorted(times, key=as_float))


def select(df: pd.DataFrame, q: Quantity, warnings: list | None = None) -> pd.DataFrame:
    """One value of ``q`` per checkpoint: a frame with run, checkpoint, step, value (and the layer used)."""
    warnings = [] if warnings is None else warnings
    rows = df[(df["metric"] == q.metric) & df["value"].notna()]
    if rows.empty:
        raise AnalysisInputError(f"unknown metric {q.metric!r} ({q}); the tables have: {_available(df)}")
    layers = set(rows["layer"])
    if q.layer == "target":
        rows = rows[rows["layer"] == "target"]
    elif q.layer == "best":
        rows = rows[~rows["layer"].isin(["", "target"])]
    elif q.layer is not None:
        rows = rows[rows["layer"] == str(q.layer)]
    elif len(layers) > 1:
        raise AnalysisInputError(f"{q}: the tables have it per layer; add @blockN, @best or @target "
                             f"(available: {_available(rows)})")
    if rows.empty:
        raise AnalysisInputError(f"{q} is not in the tables; available: {_available(df[df['metric'] == q.metric])}")
    if q.layer != "target":
        rows = _pick_timestep(rows, q, warnings)
    spread = rows.groupby(["checkpoint", "layer", "timestep"], dropna=False)["value"].nunique()
    if (spread > 1).any():  # before @best / @target reduce the rows: a conflict must not pick a winner
        ck = spread[spread > 1].index[0][0]
        files = sorted(set(rows.loc[rows["checkpoint"] == ck, "file"]))
        raise AnalysisInputError(f"{q}: checkpoint {ck} has {int(spread.max())} different values (in {', '.join(files)}; "
                             "e.g. several sampler settings): pass only the tables of one setting")
    if q.layer == "best":
        rows = rows.loc[rows.groupby("checkpoint")["value"].idxmax()]
    rows = rows.drop_duplicates("checkpoint")
    return rows[["run", "checkpoint", "step", "layer", "value"]].reset_index(drop=True)


def join(x: pd.DataFrame, y: pd.DataFrame, last_only: bool = False) -> pd.DataFrame:
    """Checkpoints with both values: run, checkpoint, step, x, y (sorted by run, step)."""
    both = x.merge(y, on="checkpoint", suffixes=("_x", "_y"))
    both = pd.DataFrame({"run": both["run_x"], "checkpoint": both["checkpoint"],
                         "step": both["step_x"].fillna(both["step_y"]), "x": both["value_x"], "y": both["value_y"]})
    both = both.dropna(subset=["x", "y"]).sort_values(["run", "step", "checkpoint"]).reset_index(drop=True)
    if last_only and len(both):
        both = both.groupby("run", sort=False).tail(1).reset_index(drop=True)
    return both


def correlate_table(df: pd.DataFrame, x: str | Quantity, y: str | Quantity, last_only: bool = False,
                    bootstrap: int = 2000, permutations: int = 10000, seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """Joined points and the statistics for quantities ``x`` and ``y`` of a :func:`load_tables` frame (no files)."""
    qx = x if isinstance(x, Quantity) else parse_quantity(x, "x")
    qy = y if isinstance(y, Quantity) else parse_quantity(y, "y")
    warnings: list = []
    check_settings(df)
    sx, sy = select(df, qx, warnings), select(df, qy, warnings)
    points = join(sx, sy, last_only)
    dropped = sorted(set(sx["checkpoint"]) ^ set(sy["checkpoint"]))
    if dropped:
        warnings.append(f"{len(dropped)} checkpoint(s) have only one of x and y and are left out: "
                        f"{', '.join(dropped[:5])}{' ...' if len(dropped) > 5 else ''}")
    for name, q in (("x", qx), ("y", qy)):
        if len(points) and points[name].nunique() == 1:
            warnings.append(f"{q} has the same value ({points[name].iloc[0]:.6g}) at every checkpoint: the "
                            "correlation is undefined (NaN); e.g. a target metric of runs that share one target")
    for w in warnings:
        log.warning("%s", w)
    if len(points) < MIN_CHECKPOINTS:
        raise AnalysisInputError(f"only {len(points)} checkpoint(s) have both {qx} and {qy}; a correlation needs at "
                             f"least {MIN_CHECKPOINTS} (no correlation computed)")
    stats = correlation(points["x"], points["y"], bootstrap, permutations, seed)
    stats.update(x=str(qx), y=str(qy), n=len(points), runs=int(points["run"].nunique()), warnings=warnings,
                 bootstrap=bootstrap, permutations=permutations, seed=seed, last_only=last_only)
    return points, stats


def run_correlate(tables: Sequence, x: str, y: str, out_dir, last_only: bool = False, bootstrap: int = 2000,
                  permutations: int = 10000, seed: int = 0) -> dict:
    """Tables -> ``out_dir/correlation.csv`` (the joined points), ``summary.json``, ``report.md`` (the
    statistics) and ``figures/`` (scatter coloured by run with steps annotated; both quantities vs training
    step on twin axes). Returns the summary."""
    for name, v in (("--bootstrap", bootstrap), ("--permutations", permutations)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise AnalysisInputError(f"{name} must be a non-negative integer, got {v!r}")
    files = find_tables(tables)
    points, stats = correlate_table(load_tables(files), x, y, last_only, bootstrap, permutations, seed)
    out = Path(out_dir)
    try:
        (out / "figures").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AnalysisInputError(f"--out {out} is not writable ({exc.strerror or exc})") from None
    removed = begin_outputs(out, ["correlation.csv", "report.md"])
    if removed:
        log.warning("--out %s held the outputs of an earlier correlation; removed %s", out, ", ".join(removed))
    write_text(out / "correlation.csv", points.to_csv(index=False))
    stem = f"{slug(stats['x'])}_vs_{slug(stats['y'])}"
    figures = scatter(points, stats, out / "figures" / f"scatter_{stem}")
    if points["step"].notna().any():
        figures += versus_step(points, stats, out / "figures" / f"steps_{stem}")
    summary = dict(stats, tables=[str(p) for p in files],
                   files={"csv": "correlation.csv", "figures": [str(p.relative_to(out)) for p in figures]})
    write_json(summary, out / "summary.json")
    write_run_report(out, "correlate", [], None, summary, [out / "correlation.csv", out / "summary.json", *figures])
    end_outputs(out)
    return summary

