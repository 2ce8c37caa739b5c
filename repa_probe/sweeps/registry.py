"""Analyses a sweep can run, by name: each maps to ONE adapter around its library entry point.

An :class:`AnalysisSpec` says how to run the analysis on a list of checkpoints into a directory (the adapter),
which keyword options it accepts (the parameters of its entry point(s), read with :mod:`inspect`, so the
options follow the library), which CSV it writes, how the per-unit CSVs are written back as one table, and
which cross-checkpoint figures are drawn from the gathered rows (the same plotting code as the single-run
commands). ``shares_work``: the checkpoints of one run go to one job, which runs them one after the other
against a shared encoder-feature cache (computed once per job, not once per checkpoint).

Adding an analysis is a few lines: write ``_run_<name>(ckpts, out_dir, options, cache_dir) -> dict`` that
calls the library, a ``_<name>_figures(rows, out_dir, runs, options)``, and ``register(AnalysisSpec(...))``.
E.g. ``fid``: ``repa_probe.analysis.fid`` writing ``fid.csv``; FID-vs-step / FID-vs-alignment figures read
the gathered tables of both analyses.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Sequence

from repa_probe.training.config import ConfigError

RESERVED = frozenset({"task", "ckpts", "out_dir", "cache_dir", "progress"})  # set by the sweep itself
SWEEP_OPTIONS = ("steps",)  # options every analysis takes, used by the sweep: steps = checkpoint steps to analyse


@dataclass(frozen=True)
class AnalysisSpec:
    name: str
    run: Callable  # (ckpts: list[Path], out_dir: Path, options: dict, cache_dir: Path) -> summary dict
    option_sources: Callable  # () -> the functions whose keyword parameters are the valid options
    table: str  # CSV written into each unit's directory and gathered under results/<name>/
    write_table: Callable  # (rows: list[dict], path: Path) -> None, the library's own CSV writer
    figures: Callable  # (rows, out_dir: Path, runs: {checkpoint label: run}, options) -> list[Path]
    shares_work: bool = False
    report_figures: tuple = ("*.png",)  # figures (globs under results/<name>/figures) shown in a study report

    def valid_options(self) -> list[str]:
        names: list[str] = []
        for fn in self.option_sources():
            for p in inspect.signature(fn).parameters.values():
                if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in RESERVED | {"entries"}:
                    names.append(p.name)
        return list(dict.fromkeys(names + list(SWEEP_OPTIONS)))

    def check_options(self, options: dict, where: str) -> dict:
        valid = self.valid_options()
        for key in options:
            if key not in valid:
                raise ConfigError(f"unknown option '{where}.{key}'; valid options of {self.name}: {', '.join(valid)}")
        return options


_REGISTRY: Dict[str, AnalysisSpec] = {}


def register(spec: AnalysisSpec) -> AnalysisSpec:
    _REGISTRY[spec.name] = spec
    return spec


def get_analysis(name: str) -> AnalysisSpec:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown analysis {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def analysis_names() -> list[str]:
    return sorted(_REGISTRY)


# ------------------------------------------------------------------------------------------ alignment
def _run_alignment(ckpts: Sequence[Path], out_dir: Path, options: dict, cache_dir: Path) -> dict:
    from repa_probe.analysis.alignment import run_alignment

    return run_alignment(list(ckpts), out_dir, cache_dir=cache_dir, progress=False, **options)


def _alignment_figures(rows: list[dict], out_dir: Path, runs: dict, options: dict) -> list[Path]:
    """Per checkpoint heatmaps, checkpoints compared per block, and alignment vs training step per run."""
    from repa_probe.analysis import plots
    from repa_probe.analysis.inputs import parse_timestep_list

    times = sorted({float(r["timestep"]) for r in rows})
    plot_t = options.get("plot_timestep")
    plot_t = parse_timestep_list(str(plot_t))[0] if plot_t is not None else \
        min(times, key=lambda v: (abs(v - 0.5), v))  # run_alignment's default: the timestep nearest 0.5
    return plots.make_figures(rows, out_dir, plot_timestep=plot_t, runs=runs)


def _alignment_sources() -> tuple:
    from repa_probe.analysis.alignment import run_alignment
    from repa_probe.analysis.inputs import resolve_context

    return run_alignment, resolve_context


# ---------------------------------------------------------------------------------- probe, segment
def _probe_runner(task: str) -> Callable:
    def run(ckpts: Sequence[Path], out_dir: Path, options: dict, cache_dir: Path) -> dict:
        from repa_probe.analysis.probing import run_probes

        return run_probes(task, list(ckpts), out_dir, cache_dir=cache_dir, progress=False, **options)
    return run


def _probe_figures(task: str) -> Callable:
    def figures(rows: list[dict], out_dir: Path, runs: dict, options: dict) -> list[Path]:
        """Metric vs block (panels per timestep) over all checkpoints, and one figure per run."""
        from repa_probe.analysis.plots import slug
        from repa_probe.analysis.probes.plots import make_probe_figures
        from repa_probe.analysis.probing import TASKS

        prefix, _, metrics, _ = TASKS[task]
        # as run_probes: top-5 of 5 classes or fewer is 1 by construction, not worth a figure
        metrics = [m for m in metrics if not (m == "top5" and all(r["value"] == 1.0 for r in rows
                                                                  if r["metric"] == "top5"))]
        paths = make_probe_figures(rows, out_dir, prefix, metrics)
        for run in sorted({r for r in runs.values() if r is not None}):
            mine = [r for r in rows if r["source"] != "model" or runs.get(r["checkpoint"]) == run]
            paths += make_probe_figures(mine, out_dir, f"{prefix}_{slug(run)}", metrics, title=run)
        return paths
    return figures


def _probe_sources() -> tuple:
    from repa_probe.analysis.probing import run_probes

    return (run_probes,)


def _write_alignment_csv(rows: list[dict], path: Path) -> None:
    from repa_probe.analysis.alignment import write_csv

    write_csv(rows, path)


def _write_probe_csv(rows: list[dict], path: Path) -> None:
    from repa_probe.analysis.probing import write_csv

    write_csv(rows, path)


register(AnalysisSpec("alignment", _run_alignment, _alignment_sources, "alignment.csv", _write_alignment_csv,
                      _alignment_figures, shares_work=True, report_figures=("steps_*.png", "layers_t*.png")))
register(AnalysisSpec("probe", _probe_runner("linear"), _probe_sources, "probe.csv", _write_probe_csv,
                      _probe_figures("linear")))
register(AnalysisSpec("segment", _probe_runner("segmentation"), _probe_sources, "segment.csv", _write_probe_csv,
                      _probe_figures("segmentation")))
