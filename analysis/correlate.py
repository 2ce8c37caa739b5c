"""`python -m analysis.correlate`: does a representation property predict generation quality across checkpoints?

Thin command line over :func:`repa_probe.analysis.correlation.correlate.run_correlate`; see `--help`.
"""
from __future__ import annotations

import argparse
import os
from typing import List, Optional

from repa_probe.errors import OneLineParser, add_debug_flags, one_line_errors, setup_logging
from repa_probe.reports.numbers import fmt, fmt_interval

DESCRIPTION = """\
Join result tables (alignment.csv with CKNNA and the spatial metrics, probe.csv / segment.csv, fid.csv) of
one or more runs per checkpoint, and relate a quantity x to a quantity y: Pearson r and Spearman rho with
percentile-bootstrap 95% intervals over checkpoints and two-sided permutation p-values, a scatter coloured by
run with the training steps annotated, and both quantities against training step on twin axes.

Quantities: METRIC[@LAYER][,t=T]
  cknna@block8,t=0.5   block 8 at t = 0.5 (also @8)      cknna@best,t=0.5   best block per checkpoint
  lds@target           the target encoder's own value     fid_inception, fd_dinov2_vitl14   FID-table metrics
A layer or t may be left out when the tables have only one. Tables with different timesteps are joined on
the shared ones (a warning lists the rest). With runs that differ only in their target encoder,
`--x lds@target --y fid_inception --last-only` is iREPA's figure (spatial structure of the target vs FID).

Outputs in --out: correlation.csv (run, checkpoint, step, x, y), summary.json (r, rho, intervals,
p-values, n, warnings), report.md and figures/ (PDF + PNG).
"""

EXAMPLES = """\
examples:
  python -m analysis.correlate --tables results/run_a results/run_b --x cknna@best,t=0.5 --y fid_inception \\
      --out results/corr
  python -m analysis.correlate --tables 'results/*/alignment.csv' 'results/*/fid.csv' --x lds@target \\
      --y fid_inception --last-only --out results/irepa_fig
"""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m analysis.correlate", description=DESCRIPTION, epilog=EXAMPLES,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", nargs="+", required=True, metavar="PATH",
                   help="result CSVs, directories (searched recursively for alignment/probe/segment/fid.csv) or "
                        "glob patterns (quote them)")
    p.add_argument("--x", required=True, metavar="QUANTITY",
                   help="e.g. cknna@block8,t=0.5, cknna@best,t=0.5, lds@target")
    p.add_argument("--y", required=True, metavar="QUANTITY", help="e.g. fid_inception or fd_dinov2_vitl14")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    p.add_argument("--last-only", action="store_true", help="one point per run: its last checkpoint (iREPA's figure)")
    p.add_argument("--bootstrap", type=int, default=2000, metavar="B",
                   help="bootstrap resamples (default 2000; 0 = off)")
    p.add_argument("--permutations", type=int, default=10000, metavar="P",
                   help="permutations for the p-values (default 10000; 0 = off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the resampling (default 0)")
    add_debug_flags(p)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    # the library (torch, data, plotting) is imported after parsing: --help and usage errors stay instant
    from repa_probe.analysis.correlation.correlate import run_correlate

    setup_logging(args.verbose)
    with one_line_errors(args.debug):
        s = run_correlate(args.tables, args.x, args.y, args.out, last_only=args.last_only, bootstrap=args.bootstrap,
                          permutations=args.permutations, seed=args.seed)
    for name, sym in (("pearson", "r"), ("spearman", "rho")):
        v = s[name]
        p = "" if v["p_perm"] is None else f"  p = {fmt(v['p_perm'], 3)}"
        print(f"{s['x']} vs {s['y']}: {sym} = {fmt_interval(v['r'], v['ci_low'], v['ci_high'])}{p}  (95% CI; "
              f"n = {s['n']} checkpoints, {s['runs']} runs)")
    print(f"wrote {os.path.join(args.out, 'correlation.csv')}, summary.json, report.md and "
          f"{len(s['files']['figures'])} figure files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
