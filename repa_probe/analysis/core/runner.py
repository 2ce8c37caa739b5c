"""The run skeleton every analysis of checkpoints shares (the file writers are in :mod:`repa_probe.analysis.core.writers`).

An analysis is a subclass of :class:`Analysis` that fills in a few hooks; :func:`run_analysis` does the rest:

1. take the options (they validate when built, :class:`~repa_probe.analysis.core.options.AnalysisOptions`);
   resolve the device;
2. ``analysis.load_entries``: load every checkpoint once (:func:`~repa_probe.analysis.core.inputs.load_checkpoints`:
   our files and official ones; small models stay in memory; FID also takes sample folders as entries without
   a model), then ``analysis.setup(run)``: validate everything else and resolve
   the light inputs (data, VAE, encoder) — every user error surfaces here, before any heavy work — and
   make the output directory (checked writable): the outputs of an earlier run in it are removed (named in
   a warning) and an ``INCOMPLETE`` marker stays until ``summary.json`` is written, so a folder never
   mixes two runs and an interrupted or failed run is marked (Ctrl-C: one line, exit 130 in the CLIs);
3. ``analysis.prepare(run)``: heavy work shared by all checkpoints (model inputs, encoder features); it may
   return rows that belong to no checkpoint (e.g. the probes' encoder reference rows);
4. for each checkpoint: take its model (loading it again if it was not kept), move it to the device,
   ``rows += analysis.analyse(run, entry, model)``, free the model, rewrite ``{csv_name}`` (a long run leaves
   partial results behind);
5. ``analysis.figures(run, rows)`` -> ``figures/*.pdf|png``, then ``summary.json`` (common fields plus
   ``analysis.summary(run, rows)``; paths relative to the folder) and ``options.json`` (the resolved options)
   beside the CSV, the rows' bootstrap replicates (a row's ``replicates`` key, popped from it) in
   ``replicates.npz`` (:mod:`repa_probe.reports.bootstrap`) and the headline numbers in ``report.md``
   (:mod:`repa_probe.reports.run_report`).

Under torchrun every rank runs the hooks (``run.dist``: sampling shards its indices) and rank 0 alone writes.

Sketch of a new analysis::

    class FooAnalysis(Analysis):
        name, columns = "foo", ("checkpoint", "step", "metric", "value")
        def setup(self, run): self.data = resolve_source(run.entries, run.options)
        def analyse(self, run, entry, model): return [dict(checkpoint=entry.label, step=entry.info.step, ...)]

    def run_foo(ckpts, out_dir, options=None):
        return run_analysis(FooAnalysis(), ckpts, out_dir, options or FooOptions())
"""
from __future__ import annotations

import abc
import dataclasses
import logging
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from repa_probe.analysis.core.inputs import CheckpointEntry, load_checkpoints
from repa_probe.analysis.core.writers import INCOMPLETE, begin_outputs, end_outputs, write_csv, write_json
from repa_probe.analysis.errors import AnalysisInputError
from repa_probe.devices import resolve_device
from repa_probe.errors import Interrupted
from repa_probe.reports.bootstrap import FILE as REPLICATES, take_replicates, write_replicates
from repa_probe.reports.run_report import write_run_report
from repa_probe.training.distributed import DistInfo, cleanup_distributed, init_distributed

log = logging.getLogger("repa_probe")


def versions() -> dict:
    """Python / torch / numpy versions and the git commit of this code (None outside a checkout)."""
    import numpy

    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, text=True,
                                           capture_output=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def make_out_dir(out_dir) -> Path:
    """``out_dir`` and ``out_dir/figures``, created and checked writable (:class:`AnalysisInputError`)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise AnalysisInputError(f"--out {out} is a file, not a folder; name a folder (it is created)")
    try:
        (out / "figures").mkdir(parents=True, exist_ok=True)
        (out / ".write_test").write_text("ok")
        (out / ".write_test").unlink()
    except OSError as exc:
        raise AnalysisInputError(f"--out {out} is not writable ({exc.strerror or exc})") from None
    return out


# ------------------------------------------------------------------------------------------ skeleton
@dataclasses.dataclass
class Run:
    """What the hooks see: the validated ``options``, the output directory ``out``, the ``device``, the
    loaded checkpoint ``entries`` (in the order given) and ``dist`` (torchrun's process group: every rank
    runs the hooks, so that work such as sampling can be sharded; rank 0 alone writes files)."""

    options: Any
    out: Path
    device: torch.device
    entries: list
    dist: DistInfo = dataclasses.field(default_factory=DistInfo)


class Analysis(abc.ABC):
    """Base of every analysis run by :func:`run_analysis` (see the module docstring).

    Attributes: ``name`` (``{name}.csv``, log lines), ``columns`` (the CSV columns), ``outputs`` (its other
    files, removed with the rest when a folder is reused).
    """

    name: str = "analysis"
    columns: Sequence[str] = ()
    outputs: Sequence[str] = ()  # files besides the CSV, summary, options, report and figures (removed on a rerun)

    @property
    def csv_name(self) -> str:
        return f"{self.name}.csv"

    def load_entries(self, ckpts: Sequence, options) -> list:
        """What is analysed, one entry each: the checkpoints (:func:`load_checkpoints`). An analysis of other
        sources (FID of sample folders) returns entries whose ``take_model()`` is None."""
        return load_checkpoints(ckpts, options)

    def setup(self, run: Run) -> None:
        """Validate and resolve light inputs; raise user errors here (before any heavy work)."""

    def prepare(self, run: Run) -> list[dict] | None:
        """Heavy work shared by every checkpoint (inputs, targets); optionally rows of no checkpoint."""

    @abc.abstractmethod
    def analyse(self, run: Run, entry: CheckpointEntry, model) -> list[dict]:
        """Rows (dicts with :attr:`columns` keys) for one checkpoint; ``model`` is on ``run.device``, eval."""

    def figures(self, run: Run, rows: list[dict]) -> list[Path]:
        """Figures under ``run.out / "figures"``; returns their paths."""
        return []

    def summary(self, run: Run, rows: list[dict]) -> dict:
        """Analysis-specific entries of ``summary.json``."""
        return {}


def run_analysis(analysis: Analysis, ckpts: Sequence, out_dir, options) -> dict:
    """Run ``analysis`` on checkpoint files / run directories ``ckpts`` with validated ``options``; write
    ``{name}.csv``, ``summary.json``, ``options.json`` and ``figures/`` under ``out_dir``.

    Returns the summary dict (also written to ``summary.json``).
    """
    device = resolve_device(options.device)  # options validated themselves when built
    dist = init_distributed(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    try:
        return _run(analysis, Run(options, Path(out_dir), device, analysis.load_entries(ckpts, options), dist))
    finally:
        if dist.enabled:
            cleanup_distributed()


def _run(analysis: Analysis, run: Run) -> dict:
    """Step 2 (setup, the output folder) and the rest under the folder's INCOMPLETE marker."""
    main = run.dist.is_main
    analysis.setup(run)
    if not main:  # torchrun: rank 0 alone writes
        return _work(analysis, run, run.out)
    out = make_out_dir(run.out)
    removed = begin_outputs(out, [analysis.csv_name, "options.json", REPLICATES, "report.md", *analysis.outputs])
    if removed:
        log.warning("--out %s held the outputs of an earlier run; removed %s", out, _describe_files(removed))
    try:
        summary = _work(analysis, run, out)
    except KeyboardInterrupt:
        raise Interrupted(f"{out} is incomplete (marked by {INCOMPLETE}; {analysis.csv_name} may hold part of the "
                          "rows); rerun the same command to redo it") from None
    end_outputs(out)
    return summary


def _describe_files(paths: list[str]) -> str:
    figures = [p for p in paths if p.startswith("figures/")]
    rest = [p for p in paths if not p.startswith("figures/")]
    return ", ".join(rest + ([f"{len(figures)} figure file(s)"] if figures else []))


def _work(analysis: Analysis, run: Run, out: Path) -> dict:
    """Steps 3-5 of the module docstring: the heavy work (every rank) and every output file (rank 0 only).
    ``run.options`` are read after setup, which may resolve a default that depends on the inputs."""
    options, device, main = run.options, run.device, run.dist.is_main
    start = time.perf_counter()
    rows: list[dict] = list(analysis.prepare(run) or [])
    replicates = take_replicates(rows)
    for entry in run.entries:
        model = entry.take_model()
        if model is not None:
            model = model.to(device)
            log.info("%s: %s (%s, %s time, step %s)", analysis.name, entry.label, entry.info.family,
                     entry.info.time_convention, entry.info.step)
        new = analysis.analyse(run, entry, model)
        replicates.update(take_replicates(new))
        rows += new
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if main:
            write_csv(rows, out / analysis.csv_name, analysis.columns)
    if not main:  # torchrun: rank 0 alone evaluates and writes
        return {"analysis": analysis.name, "files": None}
    figures = analysis.figures(run, rows)
    extra = analysis.summary(run, rows)
    summary = {
        "analysis": analysis.name,
        **extra,
        "options": options.to_dict(),
        "device": str(device),
        "checkpoints": [e.describe() for e in run.entries],
        "versions": versions(),
        "seconds": time.perf_counter() - start,
        "files": {"csv": analysis.csv_name, "options": "options.json", "report": "report.md",
                  "replicates": REPLICATES if replicates else None, **extra.get("files", {}),
                  "figures": [str(Path(p).relative_to(out)) for p in figures]},
    }
    write_replicates(replicates, out / REPLICATES)
    write_json(options.to_dict(), out / "options.json")
    write_json(summary, out / "summary.json")
    write_run_report(out, analysis.name, rows, replicates, summary,
                     [out / analysis.csv_name, out / "summary.json", out / REPLICATES, *figures])
    return summary
