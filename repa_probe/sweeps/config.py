"""Typed sweep configuration: YAML read into dataclasses with ``key.sub=value`` overrides.

Loaded through the one config loader (:func:`repa_probe.yaml_config.load_structured`), so a
misspelt key is the same one-line error listing the valid keys. ``analyses`` maps an analysis name (see
:mod:`repa_probe.sweeps.registry`) to the keyword options of its library entry point.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from repa_probe.analysis.correlation.correlate import parse_quantity
from repa_probe.errors import ReproError
from repa_probe.sweeps.registry import get_analysis
from repa_probe.yaml_config import ConfigError, load_structured


class SweepError(ReproError, RuntimeError):
    """Bad sweep input or a sweep that cannot run (one-line message)."""


@dataclass
class SweepSection:
    name: str = "sweep"  # sweep directory name under out_dir
    out_dir: str = "runs/sweeps"  # parent of the sweep directory ({out_dir}/{name}: logs, units, results)


@dataclass
class SlurmLauncher:
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    gpus_per_job: int = 1  # GPUs of one analysis job (one node)
    cpus_per_job: int = 8  # CPUs of one analysis job
    mem_gb: Optional[int] = None  # memory of one job (null = the partition's default)
    array_parallelism: int = 64  # jobs of the array running at the same time
    extra: Dict[str, Any] = field(default_factory=dict)  # extra sbatch flags, e.g. {exclude: node12}


@dataclass
class LauncherConfig:
    kind: str = "local"  # local (submitit's LocalExecutor: one process per job) or slurm
    timeout_min: int = 60  # wall time of one job; a job past it is requeued and continues
    max_requeue: int = 3  # requeues after preemption / time-out before the job counts as failed
    max_parallel: int = 1  # local: jobs running at the same time
    poll_s: float = 2.0  # seconds between progress updates
    slurm: SlurmLauncher = field(default_factory=SlurmLauncher)


@dataclass
class SweepConfig:
    sweep: SweepSection = field(default_factory=SweepSection)
    runs: List[str] = field(default_factory=list)  # run directories (every checkpoint in {run}/checkpoints)
    checkpoints: List[str] = field(default_factory=list)  # checkpoint files or globs (runs/*/checkpoints/*.pt)
    steps: List[int] = field(default_factory=list)  # keep only checkpoints at these steps (empty = all)
    analyses: Dict[str, Any] = field(default_factory=dict)  # analysis name -> options of its entry point
    # after aggregation: python -m analysis.correlate on the gathered tables, e.g. {x: cknna@best,t=0.5, y: fid_inception}
    correlations: List[Dict[str, Any]] = field(default_factory=list)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)


LAUNCHERS = ("local", "slurm")


def validate_launcher(launcher: LauncherConfig, where: str = "launcher") -> None:
    if launcher.kind not in LAUNCHERS:
        raise ConfigError(f"{where}.kind={launcher.kind!r} is not one of: {', '.join(LAUNCHERS)}")
    for key in ("timeout_min", "max_parallel"):
        if getattr(launcher, key) < 1:
            raise ConfigError(f"{where}.{key} must be >= 1, got {getattr(launcher, key)}")
    if launcher.max_requeue < 0 or launcher.poll_s <= 0:
        raise ConfigError(f"{where}.max_requeue must be >= 0 and {where}.poll_s > 0")


def validate_analyses(analyses: Dict[str, Any], where: str = "analyses") -> Dict[str, dict]:
    """Names exist in the registry and options are keywords of their entry points; returns name -> options."""
    if not analyses:
        raise ConfigError(f"no analyses configured; set {where}.<name>, e.g. {where}.alignment={{}}")
    out = {}
    for name, options in analyses.items():
        if options is not None and not isinstance(options, dict):
            raise ConfigError(f"{where}.{name} must be a mapping of options, got {options!r}")
        spec = get_analysis(name)
        out[name] = spec.check_options(dict(options or {}), f"{where}.{name}")
    return out


CORRELATION_KEYS = ("x", "y", "last_only")


def validate_correlations(items, where: str = "correlations") -> List[dict]:
    """Each item a mapping with ``x`` and ``y`` (quantities of :mod:`repa_probe.analysis.correlation.correlate`), optional
    ``last_only``; quantities are parsed here so a typo fails before any job runs."""
    out = []
    for k, item in enumerate(items or []):
        if not isinstance(item, dict) or not {"x", "y"} <= set(item) or set(item) - set(CORRELATION_KEYS):
            raise ConfigError(f"{where}[{k}] must be a mapping with x, y (and optional last_only), got {item!r}")
        parse_quantity(str(item["x"]), "x"), parse_quantity(str(item["y"]), "y")
        out.append(dict(x=str(item["x"]), y=str(item["y"]), last_only=bool(item.get("last_only", False))))
    return out


def load_sweep_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> SweepConfig:
    """Read a sweep YAML and overrides; unknown keys, analyses, options and launchers are one-line errors."""
    cfg: SweepConfig = load_structured(SweepConfig, path, overrides)
    validate_launcher(cfg.launcher)
    cfg.analyses = validate_analyses(cfg.analyses)
    cfg.correlations = validate_correlations(cfg.correlations)
    if not cfg.runs and not cfg.checkpoints:
        raise ConfigError("the sweep names no checkpoints; set runs=[DIR,...] or checkpoints=[GLOB,...]")
    return cfg
