"""Launchers (submitit's SLURM and local executors), submission, and the live progress table.

``launcher.kind=slurm``: every pending job goes into one SLURM job array (``array_parallelism`` at a time), one
node, ``gpus_per_job`` GPUs and ``cpus_per_job`` CPUs each; submitit requeues a preempted or timed-out job up to
``max_requeue`` times. ``launcher.kind=local``: submitit's LocalExecutor, one process per job, at most
``max_parallel`` at a time. Job logs (``%j_0_log.out`` / ``.err``) go to ``{sweep}/logs``.
"""
from __future__ import annotations

import logging
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from repa_probe.sweeps.config import LauncherConfig, SweepError
from repa_probe.sweeps.jobs import SweepJob

log = logging.getLogger("repa_probe")
STATES = ("pending", "running", "done", "failed")


def slurm_parameters(launcher: LauncherConfig, name: str) -> dict:
    """``AutoExecutor.update_parameters`` keywords for the ``slurm`` launcher."""
    s = launcher.slurm
    params = dict(timeout_min=launcher.timeout_min, nodes=1, tasks_per_node=1, gpus_per_node=s.gpus_per_job,
                  cpus_per_task=s.cpus_per_job, name=name, slurm_array_parallelism=s.array_parallelism)
    optional = {"slurm_partition": s.partition, "slurm_account": s.account, "slurm_qos": s.qos,
                "slurm_constraint": s.constraint, "mem_gb": s.mem_gb}
    params.update({k: v for k, v in optional.items() if v is not None})
    if s.extra:
        params["slurm_additional_parameters"] = dict(s.extra)
    return params


def make_executor(launcher: LauncherConfig, folder: Path, name: str):
    """A configured submitit executor; options submitit rejects and a missing ``sbatch`` are one-line errors."""
    import submitit

    folder.mkdir(parents=True, exist_ok=True)
    if launcher.kind == "slurm":
        if shutil.which("sbatch") is None:
            raise SweepError("launcher.kind=slurm but 'sbatch' is not on PATH; run on a SLURM login node or set "
                             "launcher.kind=local")
        try:
            executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm",
                                             slurm_max_num_timeout=launcher.max_requeue)
        except RuntimeError as exc:  # e.g. no srun: not a SLURM node
            raise SweepError(f"cannot use SLURM here: {str(exc).splitlines()[0]}") from None
        params = slurm_parameters(launcher, name)
    else:
        executor = submitit.AutoExecutor(folder=str(folder), cluster="local",
                                         local_max_num_timeout=launcher.max_requeue)
        params = dict(timeout_min=launcher.timeout_min, nodes=1, tasks_per_node=1, gpus_per_node=0)
    try:
        executor.update_parameters(**params)
    except (ValueError, TypeError, NameError, AssertionError) as exc:
        raise SweepError(f"launcher option rejected by submitit: {str(exc).splitlines()[0]}") from None
    return executor


@dataclass
class Tracked:
    """One job of this invocation: ``state`` in :data:`STATES`, the submitit job once submitted."""

    job: object  # plan.Job
    state: str = "pending"
    handle: object = None  # submitit Job
    error: Optional[str] = None

    @property
    def log_path(self) -> Optional[str]:
        return None if self.handle is None else str(self.handle.paths.stderr)

    def started(self) -> bool:
        """The job's process has begun (submitit created its log); SLURM also reports RUNNING."""
        h = self.handle
        return h is not None and (Path(h.paths.stdout).exists() or h.state in ("RUNNING", "COMPLETING"))


def error_line(exc: BaseException) -> str:
    """The last meaningful line of a job's exception (submitit wraps the remote traceback in its message)."""
    m = re.search(r"has not produced any output \(state: [^)]*\)", str(exc))
    if m:  # killed (node failure, OOM killer, scancel): say so, the log has the rest
        return f"job {m.group(0)}"
    parts = re.split(r"\n-{10,}\n?", str(exc))  # submitit: header / remote traceback / "You can check full logs"
    text = "\n".join(p for p in parts if not p.strip().startswith("You can check"))
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    tail = [ln for ln in lines if not ln.startswith(("File ", "^", "~", "raise ", "return ", "Traceback"))]
    line = (tail or lines or [type(exc).__name__])[-1]
    return re.sub(r"^(?:\w+\.)+(\w+(?:Error|Exception)\b)", r"\1", line)[:300]  # pkg.mod.XError -> XError


def _poll(t: Tracked) -> None:
    h = t.handle
    if h is None or t.state in ("done", "failed"):
        return
    if not h.done():
        t.state = "running" if t.started() else "pending"
        return
    exc = h.exception()
    if exc is None and all(u.done for u in t.job.units):
        t.state = "done"
    else:
        t.state, t.error = "failed", error_line(exc) if exc is not None else "finished without all results"


def submit_and_watch(jobs: list, launcher: LauncherConfig, folder: Path, cache_dir: Path, name: str,
                     out=None, on_change=None) -> list[Tracked]:
    """Submit ``jobs`` (throttled for local) and poll them until every one is done or failed.

    ``on_change(tracked)`` is called whenever a job changes state (the sweep records job ids and logs)."""
    tracked = [Tracked(j) for j in jobs]
    if not tracked:
        return tracked
    executor = make_executor(launcher, folder, name)
    limit = launcher.max_parallel if launcher.kind == "local" else len(tracked)
    if launcher.kind == "slurm":
        try:
            with executor.batch():
                handles = [executor.submit(SweepJob(t.job, str(cache_dir))) for t in tracked]
        except Exception as exc:  # noqa: BLE001 - sbatch failures arrive as several exception types
            raise SweepError(f"SLURM submission failed: {error_line(exc)}") from None
        for t, h in zip(tracked, handles):
            t.handle = h
    table = ProgressTable(out)
    while True:
        active = sum(t.handle is not None and t.state in ("pending", "running") for t in tracked)
        for t in tracked:
            if t.handle is None and active < limit:
                t.handle = executor.submit(SweepJob(t.job, str(cache_dir)))
                active += 1
        for t in tracked:
            _poll(t)
        if table.update(tracked) and on_change is not None:
            on_change(tracked)
        if all(t.state in ("done", "failed") for t in tracked):
            return tracked
        time.sleep(launcher.poll_s)


class ProgressTable:
    """Counts of pending / running / done / failed, redrawn in place on a terminal, a line per change otherwise."""

    def __init__(self, out=None):
        self.out = out or sys.stdout
        self.tty = hasattr(self.out, "isatty") and self.out.isatty()
        self.last: Optional[list] = None
        self.shown: list[str] = []
        self.lines = 0

    def render(self, tracked: list[Tracked]) -> list[str]:
        counts = {s: sum(t.state == s for t in tracked) for s in STATES}
        head = "sweep: " + ", ".join(f"{counts[s]} {s}" for s in STATES)
        if not self.tty:
            return [head]
        rows = [f"  {t.state:<8} {t.handle.job_id if t.handle else '-':<14} {t.job.describe()}" for t in tracked]
        return [head] + rows

    def update(self, tracked: list[Tracked]) -> bool:
        """Redraw when a job changed state or was submitted; returns whether anything changed."""
        key = [(t.state, t.handle is not None) for t in tracked]
        if key == self.last:
            return False
        lines = self.render(tracked)
        if self.tty and self.lines:
            self.out.write(f"\x1b[{self.lines}F\x1b[J")
        if self.tty or lines != self.shown:
            self.out.write("\n".join(lines) + "\n")
            self.out.flush()
        self.last, self.lines, self.shown = key, len(lines), lines
        return True
