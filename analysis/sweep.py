"""`python -m analysis.sweep --cfg configs/sweep_tiny.yaml [key.sub=value ...]`: Run analyses over many checkpoints.

Thin command line over :func:`repa_probe.sweeps.sweep.run_sweep`; see `--help`.
"""
from __future__ import annotations

import argparse
from typing import List, Optional

from repa_probe.errors import OneLineParser, add_debug_flags, one_line_errors, setup_logging

EPILOG = """\
The config names runs (every checkpoint in {run}/checkpoints) or checkpoint globs, the analyses with the
options of their library entry points (alignment, with the spatial metrics as metric: cknna,lds,...; probe;
segment; fid: sampling + FID / FD), correlations to compute on the gathered tables ({x, y} quantities of
analysis.correlate) and a launcher (local or slurm). Each (checkpoint x analysis) is a unit; alignment groups
the units of one run in one job (shared encoder features). Finished units are skipped (--force redoes them);
results are gathered under {sweep.out_dir}/{sweep.name}/results/ (results/correlation/ for correlations).

examples:
  python -m analysis.sweep --cfg configs/sweep_tiny.yaml
  python -m analysis.sweep --cfg configs/sweep_tiny.yaml --dry-run analyses.alignment.num_samples=256
  python -m analysis.sweep --cfg configs/sweep_slurm.yaml launcher.slurm.partition=gpu --retry-failed
"""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m analysis.sweep", description=__doc__.splitlines()[0].split(": ", 1)[1],
                      epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", required=True, metavar="YAML", help="sweep config (configs/sweep_*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.add_argument("--dry-run", action="store_true", help="print the jobs and what would be skipped; submit nothing")
    p.add_argument("--force", action="store_true", help="recompute units whose results already exist")
    p.add_argument("--retry-failed", action="store_true", help="resubmit jobs that failed in an earlier invocation")
    add_debug_flags(p)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # overrides before and after flags
    # the library (torch, data, plotting) is imported after parsing: --help and usage errors stay instant
    from repa_probe.sweeps.config import load_sweep_config
    from repa_probe.sweeps.sweep import run_sweep

    setup_logging(args.verbose)
    with one_line_errors(args.debug):
        cfg = load_sweep_config(args.cfg, args.overrides)
        result = run_sweep(cfg, force=args.force, retry_failed=args.retry_failed, dry_run=args.dry_run)
    for name, s in result["results"].items():
        note = "" if s["complete"] else f" (partial: {len(s['missing'])} unit(s) missing)"
        print(f"{name}: {s['done']}/{s['units']} units -> {result['sweep_dir']}/results/{name}/{s['files']['csv']}"
              f"{note}")
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
