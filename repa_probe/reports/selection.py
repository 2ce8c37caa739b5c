"""What a report compares and shows: which runs against which, at which checkpoint, block and timestep.

:class:`ReportChoice` is the ``report:`` section of a study config; :class:`ReportData` is what the report is
built from (the gathered tables, their bootstrap replicates, which run each checkpoint belongs to and each
run's REPA block). :func:`pick` selects the value a finding or a table cell uses, the same way for both.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from repa_probe.errors import ReproError

BLOCK_CHOICES = ("repa", "best")


class ReportError(ReproError, ValueError):
    """A report choice that does not fit the study (one-line message)."""


@dataclass
class ReportChoice:
    baseline: Optional[str] = None  # run compared with every other (null: the one run without REPA, else the first)
    pairs: List[List[str]] = field(default_factory=list)  # [[run_a, run_b], ...] instead of "each run vs baseline"
    block: str = "repa"  # repa (each pair at its aligned run's REPA block), best (each run's best block), or a number
    timestep: Optional[float] = None  # null: 0.5 (each table at its analysed timestep nearest to it)

    def validate(self, runs: List[str]) -> None:
        for name in ([self.baseline] if self.baseline else []) + [r for p in self.pairs for r in p]:
            if name not in runs:
                raise ReportError(f"report: unknown run {name!r}; runs: {', '.join(runs)}")
        if any(len(p) != 2 for p in self.pairs):
            raise ReportError(f"report.pairs must be [[run_a, run_b], ...], got {self.pairs!r}")
        if str(self.block) not in BLOCK_CHOICES and not str(self.block).isdigit():
            raise ReportError(f"report.block must be repa, best or a block number, got {self.block!r}")


@dataclass
class ReportData:
    tables: Dict[str, list]  # analysis -> rows (typed, as read back from its CSV)
    replicates: Dict[str, dict]  # analysis -> {row_key: (replicates, scale)}
    run_of: Dict[str, str]  # checkpoint label -> run
    repa_block: Dict[str, Optional[int]]  # run -> its REPA block (None: trained without alignment)
    runs: List[str]  # run names in the study's order


def comparisons(choice: ReportChoice, data: ReportData) -> list[tuple[str, str]]:
    """``[(run_a, run_b), ...]``: the configured pairs, else every run against the baseline."""
    if choice.pairs:
        return [tuple(p) for p in choice.pairs]
    base = choice.baseline
    if base is None:
        plain = [r for r in data.runs if data.repa_block.get(r) is None]
        base = plain[0] if len(plain) == 1 else data.runs[0]
    return [(r, base) for r in data.runs if r != base]


def final_checkpoint(rows: list[dict], data: ReportData, run: str) -> Optional[str]:
    """The checkpoint of ``run`` with the largest step among ``rows``."""
    mine = [r for r in rows if data.run_of.get(r.get("checkpoint")) == run]
    if not mine:
        return None
    return max(mine, key=lambda r: (r.get("step") is not None, r.get("step") or 0))["checkpoint"]


def nearest_time(rows: list[dict], t: Optional[float]) -> object:
    """The timestep among ``rows`` nearest ``t`` (0.5 when None); None for tables without timesteps."""
    times = sorted({r["timestep"] for r in rows if r.get("timestep") is not None}, key=str)
    numeric = [x for x in times if isinstance(x, (int, float))]
    if not numeric:
        return times[0] if times else None
    want = 0.5 if t is None else float(t)
    return min(numeric, key=lambda x: (abs(x - want), x))


def block_for(choice: ReportChoice, data: ReportData, pair: tuple[str, ...]) -> Optional[int | str]:
    """The block of a comparison: a number, ``"best"``, or the REPA block of the pair's aligned run."""
    if str(choice.block).isdigit():
        return int(choice.block)
    if choice.block == "best":
        return "best"
    blocks = [data.repa_block.get(r) for r in pair if data.repa_block.get(r) is not None]
    return blocks[0] if blocks else "best"


def pick(rows: list[dict], checkpoint: str, metric: str, block, t) -> Optional[dict]:
    """The row of ``checkpoint`` / ``metric`` at ``block`` (a number, ``"best"``: the highest value, or None
    for tables without blocks) and timestep ``t`` (None: any)."""
    cand = [r for r in rows if r.get("checkpoint") == checkpoint and r.get("metric") == metric
            and (t is None or r.get("timestep") == t) and r.get("source", "model") == "model"
            and r.get("layer") != "target" and isinstance(r.get("value"), (int, float))]
    if block is None or not cand or "layer" not in cand[0]:
        return cand[0] if cand else None
    if block == "best":
        return max(cand, key=lambda r: r["value"])
    return next((r for r in cand if r.get("layer") == block), None)


def metrics_of(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["metric"] for r in rows if r.get("metric")))
