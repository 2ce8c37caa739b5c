"""A study: train the runs (e.g. SiT with and without REPA), sweep the analyses over their checkpoints, write a
report. Used by ``python -m analysis.study --cfg configs/study_*.yaml``.

Study directory ``{study.out_dir}/{study.name}/``: ``runs/<name>/`` (training runs), ``sweep/`` (the sweep
directory, see :mod:`repa_probe.sweeps.sweep`), ``study.json`` (what was run and how long it took),
``report.md`` and ``report.html``. A run whose final checkpoint exists is not trained again, and finished
analysis units are skipped, so rerunning the command after an interruption continues the study.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from repa_probe.analysis.core.writers import write_json
from repa_probe.reports.selection import ReportChoice, ReportError
from repa_probe.sweeps.config import (LauncherConfig, SweepConfig, SweepError, SweepSection, validate_analyses,
                                      validate_correlations, validate_launcher)
from repa_probe.sweeps.launch import error_line
from repa_probe.sweeps.report import write_report
from repa_probe.sweeps.sweep import run_sweep
from repa_probe.training import launch
from repa_probe.training.config import load_config
from repa_probe.training.rundir import checkpoint_path
from repa_probe.yaml_config import ConfigError, load_structured

log = logging.getLogger("repa_probe")


@dataclass
class StudySection:
    name: str = "study"  # study directory name under out_dir
    out_dir: str = "runs/studies"  # parent of the study directory
    title: str = "REPA study"  # report title


@dataclass
class StudyTrain:
    base: Optional[str] = None  # training config YAML of every run (null = the embedded tiny default)
    overrides: List[str] = field(default_factory=list)  # key.sub=value applied to every run
    runs: Dict[str, List[str]] = field(default_factory=dict)  # run name -> its own overrides


@dataclass
class StudyConfig:
    study: StudySection = field(default_factory=StudySection)
    train: StudyTrain = field(default_factory=StudyTrain)
    steps: List[int] = field(default_factory=list)  # analyse only these checkpoint steps (empty = all)
    analyses: Dict[str, Any] = field(default_factory=dict)  # as in a sweep config
    correlations: List[Dict[str, Any]] = field(default_factory=list)  # as in a sweep config
    launcher: LauncherConfig = field(default_factory=LauncherConfig)  # analysis jobs (training: launch.*)
    report: ReportChoice = field(default_factory=ReportChoice)  # comparisons, block and timestep of the report


def load_study_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> StudyConfig:
    cfg: StudyConfig = load_structured(StudyConfig, path, overrides)
    validate_launcher(cfg.launcher)
    cfg.analyses = validate_analyses(cfg.analyses)
    cfg.correlations = validate_correlations(cfg.correlations)
    if not cfg.train.runs:
        raise ConfigError("the study trains no run; set train.runs.<name>=[overrides...]")
    for name in cfg.train.runs:
        train_config(cfg, name)  # every run's training config is valid before anything starts
    try:
        cfg.report.validate(list(cfg.train.runs))
    except ReportError as exc:
        raise ConfigError(str(exc)) from None
    return cfg


def study_dir(cfg: StudyConfig) -> Path:
    return Path(cfg.study.out_dir).expanduser() / cfg.study.name


def train_config(cfg: StudyConfig, name: str):
    """The training Config of run ``name``: base, common overrides, the run's overrides, its directory."""
    over = list(cfg.train.overrides) + list(cfg.train.runs[name] or []) + \
        [f"run.out_dir={study_dir(cfg) / 'runs'}", f"run.name={name}"]
    try:
        return load_config(cfg.train.base, over)
    except ConfigError as exc:
        raise ConfigError(f"train.runs.{name}: {exc}") from None


def _final_checkpoint(tcfg) -> Path:
    return checkpoint_path(Path(tcfg.run.out_dir) / tcfg.run.name / "checkpoints", tcfg.train.steps)


def train_runs(cfg: StudyConfig) -> dict:
    """Train every run that has not reached its final step; in this process (``launch.mode=local``, one after
    the other) or through submitit (``slurm`` / ``submitit_local``, all at once). Returns name -> info."""
    info, remote = {}, []
    for name in cfg.train.runs:
        tcfg = train_config(cfg, name)
        info[name] = dict(dir=str(Path(tcfg.run.out_dir) / name), model=tcfg.model.name, depth=tcfg.model.depth,
                          hidden_size=tcfg.model.hidden_size, steps=tcfg.train.steps,
                          proj_coeff=tcfg.repa.proj_coeff, encoder=tcfg.encoder.name,
                          encoder_depth=tcfg.repa.encoder_depth, data=tcfg.data.name,
                          resolution=tcfg.data.resolution, batch_size=tcfg.train.batch_size, trained="existing")
        if _final_checkpoint(tcfg).is_file():
            log.info("study: run %s already trained (%s), skipped", name, _final_checkpoint(tcfg))
            continue
        if tcfg.launch.mode == "local":
            start = time.perf_counter()
            launch.run(tcfg)
            info[name]["trained"] = f"{time.perf_counter() - start:.0f} s"
        else:
            remote.append((name, tcfg))
    if remote:
        with ThreadPoolExecutor(len(remote)) as pool:
            starts = {name: time.perf_counter() for name, _ in remote}
            futures = {name: pool.submit(launch.run, tcfg, None, True) for name, tcfg in remote}
            for name, fut in futures.items():
                try:
                    fut.result()
                except Exception as exc:  # noqa: BLE001 - submitit reports remote failures as several types
                    raise SweepError(f"training run {name} failed: {error_line(exc)} (logs: "
                                     f"{info[name]['dir']}/submitit)") from None
                info[name]["trained"] = f"{time.perf_counter() - starts[name]:.0f} s (submitit)"
    return info


def sweep_config(cfg: StudyConfig, runs: dict) -> SweepConfig:
    return SweepConfig(sweep=SweepSection(name="sweep", out_dir=str(study_dir(cfg))),
                       runs=[r["dir"] for r in runs.values()], steps=list(cfg.steps), analyses=dict(cfg.analyses),
                       correlations=list(cfg.correlations), launcher=cfg.launcher)


def run_study(cfg: StudyConfig, force: bool = False, retry_failed: bool = False, command: str = "") -> dict:
    """Train, sweep, report. Returns the study record (also ``study.json``) with the report paths."""
    root = study_dir(cfg)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs = train_runs(cfg)
    t1 = time.perf_counter()
    sweep = run_sweep(sweep_config(cfg, runs), force=force, retry_failed=retry_failed)
    t2 = time.perf_counter()
    record = dict(title=cfg.study.title, command=command, config=dataclasses.asdict(cfg), runs=runs,
                  sweep=dict(dir=sweep["sweep_dir"], failed=sweep["failed"], results=sweep["results"],
                             correlations=sweep["correlations"]),
                  seconds=dict(training=round(t1 - t0, 1), analyses=round(t2 - t1, 1)),
                  finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    write_json(record, root / "study.json")
    record["report"] = [str(p) for p in write_report(root, record)]
    return record
