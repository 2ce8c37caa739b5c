"""`python -m analysis.study --cfg configs/study_tiny.yaml [key.sub=value ...]`: train, analyse, report.

Thin command line over :func:`repa_probe.sweeps.study.run_study`; see `--help`.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from repa_probe.errors import OneLineParser, add_debug_flags, one_line_errors, setup_logging

EPILOG = """\
The study trains every run of train.runs (base config + common overrides + the run's overrides), then sweeps
the analyses over their checkpoints with the launcher (see python -m analysis.sweep --help) and writes
{study.out_dir}/{study.name}/report.md and report.html. Rerunning continues: trained runs and finished
analysis units are skipped.

examples:
  python -m analysis.study --cfg configs/study_tiny.yaml
  python -m analysis.study --cfg configs/study_imagenet.yaml launcher.slurm.partition=gpu launcher.slurm.account=me
"""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m analysis.study", description="Train runs with and without REPA, run the "
                      "analyses over their checkpoints and write a report.", epilog=EPILOG,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", required=True, metavar="YAML", help="study config (configs/study_*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.add_argument("--force", action="store_true", help="recompute analysis units whose results exist")
    p.add_argument("--retry-failed", action="store_true", help="resubmit analysis jobs that failed before")
    add_debug_flags(p)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # overrides before and after flags
    # the library (torch, data, plotting) is imported after parsing: --help and usage errors stay instant
    from repa_probe.sweeps.study import load_study_config, run_study

    setup_logging(args.verbose)
    command = "python -m analysis.study " + " ".join(sys.argv[1:] if argv is None else argv)
    with one_line_errors(args.debug):
        cfg = load_study_config(args.cfg, args.overrides)
        record = run_study(cfg, force=args.force, retry_failed=args.retry_failed, command=command)
    print(f"wrote {record['report'][0]} and {record['report'][1]} (training {record['seconds']['training']} s, "
          f"analyses {record['seconds']['analyses']} s)")
    return 1 if record["sweep"]["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
