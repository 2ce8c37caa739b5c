"""Run a sweep: expand, skip what is done, submit, watch, aggregate. Used by ``python -m analysis.sweep``.

Sweep directory ``{sweep.out_dir}/{sweep.name}/``: ``sweep.yaml`` (resolved config), ``state.json`` (the last
state, job id, error and log of every submitted job), ``logs/`` (submitit: one ``.out`` / ``.err`` per job),
``units/`` (per unit results), ``cache/`` (encoder features shared by all jobs), ``results/`` (aggregates).
A job that failed in an earlier invocation is reported again but not resubmitted unless ``retry_failed``.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import yaml

from repa_probe.sweeps.aggregate import aggregate, correlate_results
from repa_probe.sweeps.config import SweepConfig, SweepError
from repa_probe.analysis.core.writers import read_json, write_json
from repa_probe.sweeps.launch import submit_and_watch
from repa_probe.sweeps.plan import Job, expand, pending

log = logging.getLogger("repa_probe")


def sweep_dir(cfg: SweepConfig) -> Path:
    return Path(cfg.sweep.out_dir).expanduser() / cfg.sweep.name


def plan_jobs(cfg: SweepConfig, force: bool = False, retry_failed: bool = False):
    """-> (all jobs, jobs to submit, jobs that failed before and are held back, state dict)."""
    root = sweep_dir(cfg)
    jobs = expand(cfg, root)
    state = read_json(root / "state.json", {}) or {}
    todo = list(jobs) if force else pending(jobs)
    held = [] if retry_failed or force else [j for j in todo if state.get(j.key, {}).get("state") == "failed"]
    return jobs, [j for j in todo if j not in held], held, state


def dry_run_lines(jobs: list[Job], submit: list[Job], held: list[Job], state: dict) -> list[str]:
    lines = []
    for j in jobs:
        action = "submit" if j in submit else "failed before (--retry-failed)" if j in held else "done, skip"
        if j in submit and any(u.done for u in j.units):
            action += f" ({sum(not u.done for u in j.units)} of {len(j.units)} units left)"
        lines.append(f"{action:<34} {j.key}  [{j.describe()}]")
    lines.append(f"{len(submit)} job(s) to submit, {len(jobs) - len(submit) - len(held)} done, {len(held)} failed "
                 "before")
    return lines


def run_sweep(cfg: SweepConfig, force: bool = False, retry_failed: bool = False, dry_run: bool = False,
              out=None) -> dict:
    """Run (or with ``dry_run`` only list) the sweep's jobs; returns {"results": per-analysis summaries,
    "failed": [{job, error, log}], "sweep_dir": path}. Failed jobs never hide the others' results."""
    out = out or sys.stdout
    root = sweep_dir(cfg)
    jobs, submit, held, state = plan_jobs(cfg, force, retry_failed)
    if dry_run:
        for line in dry_run_lines(jobs, submit, held, state):
            print(line, file=out)
        return {"results": {}, "correlations": [], "failed": [], "sweep_dir": str(root),
                "planned": [j.key for j in submit]}
    try:
        root.mkdir(parents=True, exist_ok=True)
        (root / "sweep.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    except OSError as exc:
        raise SweepError(f"sweep.out_dir: cannot write {root} ({exc.strerror or exc})") from None
    if force:
        pending(submit, force=True)
    log.info("sweep %s: %d job(s) to run, %d already done, %d failed before", root, len(submit),
             len(jobs) - len(submit) - len(held), len(held))

    def record(tracked) -> None:  # after every change, so that job ids and logs survive a killed driver
        for t in tracked:
            state[t.job.key] = dict(state=t.state, job_id=t.handle.job_id if t.handle else None, log=t.log_path,
                                    error=t.error, checkpoints=[u.ckpt.label for u in t.job.units])
        write_json(state, root / "state.json")

    tracked = submit_and_watch(submit, cfg.launcher, root / "logs", root / "cache", cfg.sweep.name, out=out,
                               on_change=record)
    record(tracked)
    results = aggregate(jobs, root, state)
    correlations = correlate_results(root, cfg.correlations)
    failed = [dict(job=k, error=v.get("error"), log=v.get("log")) for k, v in state.items()
              if v.get("state") == "failed" and k in {j.key for j in submit + held}]
    for f in failed:
        print(f"failed: {f['job']}: {f['error']} (log: {f['log']})", file=out)
    if failed:
        print(f"{len(failed)} job(s) failed; fix the cause and rerun with --retry-failed", file=out)
    return {"results": results, "correlations": correlations, "failed": failed, "sweep_dir": str(root)}
