"""Findings: each comparison of the study (run vs baseline, or a configured pair) for every metric, as a
difference with a paired bootstrap 95% interval and one generated sentence, plus one sentence per correlation.

A difference whose interval contains 0 is "unresolved". The sentence is written from the same numbers and the
same rounding (:mod:`.numbers`) as ``findings.csv`` and the report's tables.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from repa_probe.reports import numbers as N
from repa_probe.reports.bootstrap import difference, interval, row_key
from repa_probe.reports.selection import (ReportChoice, ReportData, block_for, comparisons, final_checkpoint,
                                          metrics_of, nearest_time, pick)

CSV_COLUMNS = ("analysis", "metric", "run_a", "run_b", "checkpoint_a", "checkpoint_b", "block_a", "block_b",
               "timestep", "value_a", "ci_low_a", "ci_high_a", "value_b", "ci_low_b", "ci_high_b", "difference",
               "ci_low", "ci_high", "resolved", "replicates", "sentence")


@dataclass
class Side:
    run: str
    row: dict
    ci: tuple  # (low, high) or (None, None)
    reps: object  # replicates (B,) or None

    @property
    def text(self) -> str:
        return N.fmt_interval(self.row["value"], *self.ci).split(" [")[0]


@dataclass
class Finding:
    analysis: str
    metric: str
    a: Side
    b: Side
    block: object  # a number, "best" or None
    timestep: object
    difference: float
    ci: tuple

    @property
    def resolved(self) -> Optional[bool]:
        lo, hi = self.ci
        return None if lo is None else not (lo <= 0 <= hi)

    def where(self) -> str:
        parts = []
        if self.block == "best":
            parts.append(f"at the best block ({self.a.row['layer']} vs {self.b.row['layer']})")
        elif self.block is not None:
            parts.append(f"at block {self.block}")
        if self.timestep is not None:
            parts.append(f"t = {N.time_label(self.timestep)}")
        steps = {self.a.row.get("step"), self.b.row.get("step")}
        if None not in steps:
            parts.append(f"step {'/'.join(str(s) for s in sorted(steps))}")
        text = ", ".join(parts)
        return text if not text or text.startswith("at ") else f"at {text}"

    def diff_text(self) -> str:
        return N.fmt_interval(self.difference, *self.ci, sign=True)

    def sentence(self) -> str:
        hint = ", lower is better" if N.lower_is_better(self.metric) else ""
        text = (f"{self.a.run} vs {self.b.run}: {N.metric_label(self.metric)} {self.where()}{hint}: "
                f"{self.a.text} vs {self.b.text}, {self.diff_text()}")
        if self.resolved is None:
            return text + " (no interval: the analysis stored no bootstrap replicates)."
        return text + ("." if self.resolved else "; unresolved (the interval contains 0).")

    def csv_row(self) -> dict:
        return dict(analysis=self.analysis, metric=self.metric, run_a=self.a.run, run_b=self.b.run,
                    checkpoint_a=self.a.row["checkpoint"], checkpoint_b=self.b.row["checkpoint"],
                    block_a=self.a.row.get("layer"), block_b=self.b.row.get("layer"), timestep=self.timestep,
                    value_a=self.a.row["value"], ci_low_a=self.a.ci[0], ci_high_a=self.a.ci[1],
                    value_b=self.b.row["value"], ci_low_b=self.b.ci[0], ci_high_b=self.b.ci[1],
                    difference=self.difference, ci_low=self.ci[0], ci_high=self.ci[1], resolved=self.resolved,
                    replicates=0 if self.a.reps is None else len(self.a.reps), sentence=self.sentence())


def side(data: ReportData, analysis: str, run: str, row: dict) -> Side:
    """A run's value with its own interval and replicates (if the analysis stored them)."""
    reps, scale = data.replicates.get(analysis, {}).get(row_key(row), (None, 1.0))
    return Side(run, row, interval(row["value"], reps, scale) if reps is not None else (None, None), reps)


def where_of(choice: ReportChoice, data: ReportData, rows: list[dict], pair: tuple) -> tuple:
    """``(block, timestep)`` of an analysis' table for a comparison (None where the table has neither)."""
    block = block_for(choice, data, pair) if rows and "layer" in rows[0] else None
    t = nearest_time(rows, choice.timestep) if rows and "timestep" in rows[0] else None
    return block, t


def find(choice: ReportChoice, data: ReportData) -> list[Finding]:
    """Every comparison x analysis x metric with a value on both sides (final checkpoint of each run)."""
    out = []
    for pair in comparisons(choice, data):
        for analysis, rows in data.tables.items():
            block, t = where_of(choice, data, rows, pair)
            ca, cb = (final_checkpoint(rows, data, r) for r in pair)
            if ca is None or cb is None:
                continue
            for metric in metrics_of(rows):
                ra, rb = pick(rows, ca, metric, block, t), pick(rows, cb, metric, block, t)
                if ra is None or rb is None:
                    continue
                a, b = side(data, analysis, pair[0], ra), side(data, analysis, pair[1], rb)
                scale = data.replicates.get(analysis, {}).get(row_key(ra), (None, 1.0))[1]
                d, lo, hi = difference(ra["value"], rb["value"], a.reps, b.reps, scale)
                out.append(Finding(analysis, metric, a, b, block, t, d, (lo, hi)))
    return out


def correlation_sentence(c: dict) -> Optional[str]:
    """``"cknna@best,t=0.5 vs fd_tiny_vit over 6 checkpoints: Pearson r = -0.52 [-0.95, 0.61], p = 0.29;
    unresolved ..."`` from a sweep's correlation record (None when it was not computed)."""
    if c.get("error") or not c.get("summary"):
        return None
    s = c["summary"]
    parts = []
    for stat in ("pearson", "spearman"):
        v = s.get(stat) or {}
        lo, hi = v.get("ci_low"), v.get("ci_high")
        p = v.get("p_perm")
        parts.append(f"{stat.capitalize()} {'r' if stat == 'pearson' else 'rho'} = "
                     f"{N.fmt_interval(v.get('r'), lo, hi)}" + (f", p = {N.fmt(p, 2)}" if N.finite(p) else ""))
    pv = s.get("pearson") or {}
    unresolved = N.finite(pv.get("ci_low")) and pv["ci_low"] <= 0 <= pv["ci_high"]
    n = s.get("n")
    scope = " (last checkpoint of each run)" if c.get("last_only") else ""
    return (f"`{c['x']}` vs `{c['y']}` over {n} checkpoints{scope}: " + "; ".join(parts)
            + ("; unresolved (the Pearson interval contains 0)." if unresolved else "."))
