"""From a sweep config to units and jobs.

A *unit* is one (checkpoint × analysis): its results live in ``{sweep}/units/{analysis}/{key}/`` and a
``done.json`` marker written last (atomically) says they are complete. The key is the checkpoint label plus a
hash of (analysis, checkpoint path, options): changing an option makes new units, never mixes results.
A *job* is what a launcher submits: one unit, or, for analyses that share work across checkpoints
(``AnalysisSpec.shares_work``), every unit of one run. Units already done are skipped (``force`` redoes them),
so a job with nothing left is not submitted, and a requeued job continues at its first unfinished unit.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from repa_probe.sweeps.config import SweepConfig, SweepError
from repa_probe.sweeps.registry import get_analysis
from repa_probe.training.rundir import CKPT_RE, checkpoint_label, checkpoint_run, list_checkpoints

DONE = "done.json"


@dataclass(frozen=True)
class Checkpoint:
    path: str  # absolute path
    label: str  # "{run}/{stem}" inside a run's checkpoints/ folder, else the file stem (as the analyses label it)
    run: Optional[str]
    step: Optional[int]


@dataclass
class Unit:
    analysis: str
    ckpt: Checkpoint
    key: str
    out_dir: str

    @property
    def done(self) -> bool:
        return (Path(self.out_dir) / DONE).is_file()


@dataclass
class Job:
    key: str
    analysis: str
    options: dict
    units: list = field(default_factory=list)

    def describe(self) -> str:
        return f"{self.analysis}: {', '.join(u.ckpt.label for u in self.units)}"


def _checkpoint(path: Path) -> Checkpoint:
    path = path.resolve()
    m = CKPT_RE.match(path.name)
    return Checkpoint(str(path), checkpoint_label(path), checkpoint_run(path), int(m.group(1)) if m else None)


def discover(cfg: SweepConfig) -> list[Checkpoint]:
    """Every checkpoint named by ``cfg.runs`` / ``cfg.checkpoints``, filtered by ``cfg.steps``; one-line errors."""
    found: list[Path] = []
    for run in cfg.runs:
        d = Path(os.path.expanduser(run))
        d = d / "checkpoints" if (d / "checkpoints").is_dir() else d
        paths = [p for _, p in list_checkpoints(d)]
        if not paths:
            raise SweepError(f"runs: {run} has no checkpoints ({{step:07d}}.pt in {d})")
        found += paths
    for pattern in cfg.checkpoints:
        matched = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern)) if Path(p).is_file())
        if not matched:
            raise SweepError(f"checkpoints: {pattern!r} matches no file")
        found += matched
    ckpts = list({c.path: c for c in map(_checkpoint, found)}.values())
    if cfg.steps:
        ckpts = [c for c in ckpts if c.step in set(cfg.steps)]
    if not ckpts:
        raise SweepError(f"the sweep matches no checkpoint (runs={cfg.runs}, checkpoints={cfg.checkpoints}, "
                         f"steps={cfg.steps})")
    labels: dict = {}
    for c in ckpts:
        if c.label in labels:
            raise SweepError(f"two checkpoints share the label {c.label!r}: {labels[c.label]} and {c.path}; "
                             "rename one or keep it inside its run's checkpoints/ folder")
        labels[c.label] = c.path
    return ckpts


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def unit_for(sweep_dir: Path, analysis: str, ckpt: Checkpoint, options: dict) -> Unit:
    key = f"{ckpt.label.replace('/', '_')}-{_hash(analysis, ckpt.path, options)}"
    return Unit(analysis, ckpt, key, str(sweep_dir / "units" / analysis / key))


def expand(cfg: SweepConfig, sweep_dir: Path, ckpts: Optional[list] = None) -> list[Job]:
    """All jobs of the sweep (done units included), in a stable order: analysis, then run / checkpoint."""
    ckpts = discover(cfg) if ckpts is None else ckpts
    jobs: list[Job] = []
    for name, options in cfg.analyses.items():
        spec = get_analysis(name)
        options = dict(options)
        steps = options.pop("checkpoint_steps", None)  # a sweep option (registry.SWEEP_OPTIONS), not the entry point's
        mine = [c for c in ckpts if not steps or c.step in set(steps)]
        if not mine:
            raise SweepError(f"analyses.{name}.checkpoint_steps={steps} matches none of the sweep's checkpoints")
        units = [unit_for(sweep_dir, name, c, options) for c in mine]
        if spec.shares_work:
            groups: dict = {}
            for u in units:
                groups.setdefault(u.ckpt.run or u.ckpt.label, []).append(u)
            batches = [(f"{name}-{g.replace('/', '_')}", us) for g, us in groups.items()]
        else:
            batches = [(f"{name}-{u.key}", [u]) for u in units]
        for key, us in batches:
            jobs.append(Job(f"{key}-{_hash([u.key for u in us])}" if spec.shares_work else key, name, options, us))
    return jobs


def pending(jobs: list[Job], force: bool = False) -> list[Job]:
    """Jobs with at least one unit to compute; ``force`` deletes every marker so that all units run again."""
    if force:
        for job in jobs:
            for u in job.units:
                (Path(u.out_dir) / DONE).unlink(missing_ok=True)
        return list(jobs)
    return [j for j in jobs if not all(u.done for u in j.units)]
