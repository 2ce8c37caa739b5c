"""What runs inside a submitted job: the units of one :class:`~repa_probe.sweeps.plan.Job`, one after the other.

:class:`SweepJob` is the picklable callable submitit runs. Each unit calls its analysis adapter on one
checkpoint into the unit's directory, then writes ``done.json`` atomically; a unit without it is
(re)computed. On preemption or time-out submitit calls :meth:`SweepJob.checkpoint`, which requeues the same
job: it starts again at its first unfinished unit (an analysis that resumes its own folder, like sampling,
continues inside the unit too).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from repa_probe.analysis.core.writers import write_json
from repa_probe.errors import setup_logging
from repa_probe.sweeps.plan import DONE
from repa_probe.sweeps.registry import get_analysis

log = logging.getLogger("repa_probe")


class SweepJob:
    """Runs the unfinished units of ``job`` (a :class:`~repa_probe.sweeps.plan.Job`) with a shared cache."""

    def __init__(self, job, cache_dir: str):
        self.job = job
        self.cache_dir = cache_dir

    def __call__(self) -> dict:
        setup_logging()
        spec = get_analysis(self.job.analysis)
        ran = []
        for unit in self.job.units:
            if unit.done:
                log.info("%s %s: already done, skipped", self.job.analysis, unit.ckpt.label)
                continue
            out = Path(unit.out_dir)
            out.mkdir(parents=True, exist_ok=True)
            log.info("%s %s: running into %s", self.job.analysis, unit.ckpt.label, out)
            start = time.perf_counter()
            spec.run([Path(unit.ckpt.path)], out, dict(self.job.options), Path(self.cache_dir))
            write_json(dict(analysis=self.job.analysis, checkpoint=unit.ckpt.label, path=unit.ckpt.path,
                            run=unit.ckpt.run, step=unit.ckpt.step, table=spec.table,
                            seconds=round(time.perf_counter() - start, 2), options=self.job.options,
                            finished=time.strftime("%Y-%m-%dT%H:%M:%S")), out / DONE)
            ran.append(unit.ckpt.label)
        return {"job": self.job.key, "ran": ran}

    def checkpoint(self, *args, **kwargs):
        """submitit's preemption / time-out hook: requeue this job; done units are skipped on restart."""
        import submitit

        return submitit.helpers.DelayedSubmission(SweepJob(self.job, self.cache_dir))
