"""Benchmark the alignment command: all five metrics (``--metric cknna,lds,cds,srss,rmsc``) against CKNNA alone.

Both share one capture pass per (batch, timestep) (:mod:`repa_probe.analysis.core.capture`), so the spatial
metrics add only their own arithmetic (and the target encoder's patch-token pass) to the CKNNA run. Goal
(issue 17): at most 1.2x.

Each round runs ``python -m analysis.alignment``'s ``main`` in this process on the same checkpoints, once per
variant (order alternating between rounds, encoder-feature cache off so both compute their targets); the
ratio is the median of the per-round ratios. Python start-up and imports are not timed (both pay them once).

  python -m train                                   # makes runs/tiny (2 checkpoints)
  python benchmarks/alignment_metrics.py            # runs/tiny, 3 rounds
  python benchmarks/alignment_metrics.py --ckpt runs/tiny --rounds 5 --figures none     # compute only
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from analysis.alignment import main as alignment_main  # noqa: E402

VARIANTS = {"cknna": "cknna", "all five": "cknna,lds,cds,srss,rmsc"}


def time_variant(ckpt: str, metric: str, args, out: str) -> float:
    """Seconds of one alignment run (``main`` in-process, quiet, no encoder cache)."""
    t0 = time.perf_counter()
    rc = alignment_main(["--ckpt", ckpt, "--out", out, "--metric", metric, "--timesteps", args.timesteps,
                         "--figures", args.figures, "--no-cache", "-q"])
    if rc != 0:
        raise SystemExit(f"alignment failed with exit code {rc}")
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="runs/tiny", help="checkpoint or run directory (default: %(default)s)")
    p.add_argument("--timesteps", default="0,0.25,0.5,0.75,1")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--figures", default="summary", help="the alignment's --figures (default %(default)s; none: "
                   "compute only)")
    args = p.parse_args()
    if not os.path.exists(args.ckpt):
        raise SystemExit(f"{args.ckpt} not found: run `python -m train` first")
    times: dict = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        time_variant(args.ckpt, "cknna", args, os.path.join(tmp, "warm"))      # warm-up, untimed
        for r in range(args.rounds):
            order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
            for name in order:
                times[name].append(time_variant(args.ckpt, VARIANTS[name], args, os.path.join(tmp, name)))
    ratios = [a / c for a, c in zip(times["all five"], times["cknna"])]
    print(f"{'variant':>10} {'median s':>9} {'min s':>7} {'max s':>7}")
    for name, ts in times.items():
        print(f"{name:>10} {statistics.median(ts):>9.2f} {min(ts):>7.2f} {max(ts):>7.2f}")
    print(f"--figures {args.figures}; ratio all five / cknna: median {statistics.median(ratios):.2f}x (rounds: "
          f"{', '.join(f'{x:.2f}' for x in ratios)}); goal <= 1.2x")


if __name__ == "__main__":
    main()
