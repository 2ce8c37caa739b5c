"""Analyses a sweep can run, by name: each maps to ONE adapter around its library entry point.

An :class:`AnalysisSpec` says how to run the analysis on a list of checkpoints into a directory (the adapter),
which options it accepts (the fields of its options dataclass, so the options follow the library), which CSV
it writes, how the per-unit CSVs are written back as one table, and which cross-checkpoint figures are drawn
from the gathered rows (the same plotting code as the single-run commands). ``shares_work``: the checkpoints of one run go to one job, which runs them one after the other
against a shared encoder-feature cache (computed once per job, not once per checkpoint).

Adding an analysis is a few lines: write ``_run_<name>(ckpts, out_dir, options, cache_dir) -> dict`` that
calls the library, a ``_<name>_figures(rows, out_dir, runs, options)``, and ``register(AnalysisSpec(...))``.
Spatial metrics are alignment options (``metric: cknna,lds,cds``); the correlation of the gathered tables
(e.g. FID vs alignment) is drawn by :mod:`repa_probe.sweeps.aggregate` once every analysis is gathered.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Sequence

from repa_probe.analysis.alignment import plots
from repa_probe.analysis.alignment.run import CSV_COLUMNS as ALIGNMENT_COLUMNS, run_alignment
from repa_probe.analysis.generation.options import FidOptions
from repa_probe.analysis.generation.run import CSV_COLUMNS as FID_COLUMNS, run_fid
from repa_probe.analysis.core.options import AlignmentOptions, ProbeOptions
from repa_probe.analysis.core.plots import slug
from repa_probe.analysis.core.writers import write_csv
from repa_probe.analysis.generation.fid import fid_vs_step
from repa_probe.analysis.probes.plots import make_probe_figures
from repa_probe.analysis.probes.run import CSV_COLUMNS as PROBE_COLUMNS, TASK_SPECS, run_probes
from repa_probe.errors import ReproError
from repa_probe.timesteps import label
from repa_probe.training.config import ConfigError

RESERVED = frozenset({"task", "ckpts", "samples", "out_dir", "cache_dir", "progress"})  # set by the sweep itself
SWEEP_OPTIONS = ("checkpoint_steps",)  # options every analysis takes, used by the sweep: the checkpoint steps it analyses


@dataclass(frozen=True)
class AnalysisSpec:
    name: str
    run: Callable  # (ckpts: list[Path], out_dir: Path, options: dict, cache_dir: Path) -> summary dict
    option_sources: Callable  # () -> the options dataclasses whose fields are the valid options
    table: str  # CSV written into each unit's directory and gathered under results/<name>/
    columns: Sequence[str]  # the table's columns (the library's own), written back with writers.write_csv
    figures: Callable  # (rows, out_dir: Path, runs: {checkpoint label: run}, options) -> list[Path]
    shares_work: bool = False
    report_figures: tuple = ("*.png",)  # figures (globs under results/<name>/figures) in a study report's appendix

    def valid_options(self) -> list[str]:
        names = [f.name for src in self.option_sources() for f in dataclasses.fields(src) if f.name not in RESERVED]
        return list(dict.fromkeys(names + list(SWEEP_OPTIONS)))

    def check_options(self, options: dict, where: str) -> dict:
        """Names and values: an unknown option, or a bad value of an options dataclass' field (built here, as
        the job will build it), is a :class:`ConfigError` when the config is read, before any job runs."""
        valid = self.valid_options()
        for key in options:
            if key not in valid:
                raise ConfigError(f"unknown option '{where}.{key}'; valid options of {self.name}: {', '.join(valid)}")
        for src in self.option_sources():
            if dataclasses.is_dataclass(src):
                names = {f.name for f in dataclasses.fields(src)}
                try:
                    src(**{k: v for k, v in options.items() if k in names})
                except (ReproError, TypeError, ValueError) as exc:
                    raise ConfigError(f"{where}: {str(exc).splitlines()[0]}") from None
        return options

    def write_table(self, rows: list[dict], path: Path) -> None:
        write_csv(rows, path, self.columns)


_REGISTRY: Dict[str, AnalysisSpec] = {}


def register(spec: AnalysisSpec) -> AnalysisSpec:
    _REGISTRY[spec.name] = spec
    return spec


def get_analysis(name: str) -> AnalysisSpec:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown analysis {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


# ------------------------------------------------------------------------------------------ alignment
def _run_alignment(ckpts: Sequence[Path], out_dir: Path, options: dict, cache_dir: Path) -> dict:
    return run_alignment(list(ckpts), out_dir, AlignmentOptions(cache_dir=cache_dir, progress=False, **options))


def _alignment_figures(rows: list[dict], out_dir: Path, runs: dict, options: dict) -> list[Path]:
    """Per checkpoint heatmaps, checkpoints compared per block, and alignment vs training step per run (the
    spatial metrics' target rows are a reference, not a block)."""
    opts = AlignmentOptions(timesteps=options.get("timesteps", AlignmentOptions.timesteps),
                            plot_timestep=options.get("plot_timestep"))
    model_rows = [r for r in rows if r.get("layer") != "target"]
    return plots.make_figures(model_rows, out_dir, plot_timestep=label(opts.plot_timestep), runs=runs)


# ---------------------------------------------------------------------------------- probe, segment
def _probe_runner(task: str) -> Callable:
    def run(ckpts: Sequence[Path], out_dir: Path, options: dict, cache_dir: Path) -> dict:
        return run_probes(list(ckpts), out_dir, ProbeOptions(task=task, cache_dir=cache_dir, progress=False,
                                                             **options))
    return run


def _probe_figures(task: str) -> Callable:
    def figures(rows: list[dict], out_dir: Path, runs: dict, options: dict) -> list[Path]:
        """Metric vs block (panels per timestep) over all checkpoints, and one figure per run."""
        prefix, _, metrics, _ = TASK_SPECS[task]  # metrics without rows (top-5 of <= 5 classes) are skipped
        paths = make_probe_figures(rows, out_dir, prefix, metrics)
        for run in sorted({r for r in runs.values() if r is not None}):
            mine = [r for r in rows if r["source"] != "model" or runs.get(r["checkpoint"]) == run]
            paths += make_probe_figures(mine, out_dir, f"{prefix}_{slug(run)}", metrics, title=run)
        return paths
    return figures


# ------------------------------------------------------------------------------------ sampling + FID
def _run_fid(ckpts: Sequence[Path], out_dir: Path, options: dict, cache_dir: Path) -> dict:
    """Sample each checkpoint into ``out_dir/samples`` (resumable: a requeued job continues its folder), then
    FID / FD against the reference."""
    return run_fid(list(ckpts), out_dir, FidOptions(progress=False, **options))


def _fid_figures(rows: list[dict], out_dir: Path, runs: dict, options: dict) -> list[Path]:
    return fid_vs_step(rows, Path(out_dir) / "fid_vs_step", runs)


register(AnalysisSpec("alignment", _run_alignment, lambda: (AlignmentOptions,), "alignment.csv",
                      ALIGNMENT_COLUMNS, _alignment_figures, shares_work=True,
                      report_figures=("steps_*.png", "layers_t*.png")))
register(AnalysisSpec("probe", _probe_runner("linear"), lambda: (ProbeOptions,), "probe.csv",
                      PROBE_COLUMNS, _probe_figures("linear")))
register(AnalysisSpec("segment", _probe_runner("segmentation"), lambda: (ProbeOptions,), "segment.csv",
                      PROBE_COLUMNS, _probe_figures("segmentation")))
register(AnalysisSpec("fid", _run_fid, lambda: (FidOptions,), "fid.csv", FID_COLUMNS, _fid_figures))
