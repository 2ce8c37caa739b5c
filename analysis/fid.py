"""`python -m analysis.fid`: FID / FD of samples (or of every checkpoint of a run) against a reference.

Thin command line over :func:`repa_probe.analysis.generation.run.run_fid`; see `--help`.
"""
from __future__ import annotations

import argparse
import os
from typing import List, Optional

from analysis.common import add_sampler_options
from repa_probe.errors import OneLineParser, add_debug_flags, setup_logging
from repa_probe.reports.numbers import fmt

DESCRIPTION = """\
Evaluate generated samples. With --ckpt (a checkpoint, a run directory = every checkpoint, or an official
file) the samples are drawn first (as `python -m analysis.sample`, into OUT/samples/); with --samples an
existing folder or ADM .npz is evaluated.

Metrics are named for their feature space: fid_inception (torch-fidelity's ADM-compatible Inception, needs
--inception-weights; also --isc, --kid, --prc), fd_dinov2_vitl14 (--fd-dinov2: dgm-eval's FD_DINOv2, CLS at
224 px) and fd_<encoder> (--encoder NAME: any target encoder of the project). With no metric option, one of
our runs is evaluated in its own target-encoder space (+ Inception FID when --inception-weights is given)
against its own dataset (held-out split): `python -m analysis.fid --ckpt runs/tiny/checkpoints --out DIR`
works offline. Fréchet distances are computed in float64.

Reference (--ref): an ADM reference batch .npz (mu/sigma; its arr_0 only for KID and precision/recall), an
image folder or .npz of images, or OUT/reference_stats.pt of an earlier run.
Outputs: fid.csv (checkpoint, run, step, metric, value, num_samples, sampler settings), summary.json,
options.json, reference_stats.pt, figures/fid_vs_step.{pdf,png}, report.md and, with --bootstrap,
replicates.npz. The reference goes through each feature extractor once per run (also for KID /
precision-recall), and every input (weights files, reference, encoders) is checked before any sampling.
"""

EXAMPLES = """\
examples:
  python -m analysis.fid --ckpt runs/tiny/checkpoints --out results/fid_tiny
  python -m analysis.fid --samples samples/repa_xl/samples.npz --ref VIRTUAL_imagenet256_labeled.npz \\
      --inception-weights weights-inception-2015-12-05-6726825d.pth --isc --prc --out results/fid_repa_xl
"""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m analysis.fid", description=DESCRIPTION, epilog=EXAMPLES,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", action="append", metavar="PATH", help="checkpoint / run directory to sample "
                   "and evaluate (repeatable)")
    p.add_argument("--samples", action="append", metavar="DIR|NPZ", help="existing samples (repeatable)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--ref", metavar="NPZ|DIR|PT", help="reference (default for our runs: the run's dataset)")
    g = p.add_argument_group("metrics")
    g.add_argument("--inception-weights", metavar="FILE", help="torch-fidelity Inception weights file "
                   "(weights-inception-2015-12-05-6726825d.pth): enables fid_inception")
    g.add_argument("--isc", action="store_true", help="Inception Score (ADM's splits: ceil(N / 5000), i.e. 10 "
                   "at N = 50000, contiguous, no shuffle)")
    g.add_argument("--kid", action="store_true", help="Kernel Inception Distance (needs reference images)")
    g.add_argument("--prc", action="store_true", help="precision/recall, k=3 on Inception features")
    g.add_argument("--fd-dinov2", action="store_true", help="FD_DINOv2 (dgm-eval protocol, ViT-L/14)")
    g.add_argument("--dinov2-weights", metavar="FILE", help="local DINOv2 ViT-L/14 weights for --fd-dinov2")
    g.add_argument("--encoder", metavar="NAME", help="FD in this target encoder's space (fd_<NAME>)")
    g.add_argument("--encoder-weights", metavar="FILE", help="local weights of --encoder")
    g.add_argument("--random-encoder", action="store_true", help="random-initialised --encoder (tests only)")
    g.add_argument("--bootstrap", type=int, default=0, metavar="B", help="replicates of each Fréchet distance over "
                   "the samples (resampled with replacement) for 95%% intervals: replicates.npz, report.md "
                   "(0 = off; each costs one covariance and one Fréchet distance)")
    add_sampler_options(p)
    g = p.add_argument_group("running")
    g.add_argument("--batch-size", type=int, default=256, help="samples and images per batch (default 256)")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_debug_flags(g)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from repa_probe.analysis.generation.options import FidOptions
    from repa_probe.analysis.generation.run import run_fid
    from repa_probe.errors import one_line_errors

    with one_line_errors(args.debug):
        summary = run_fid(args.ckpt, args.out, FidOptions.from_namespace(args, progress=not args.quiet))
    if summary["files"] is None:  # torchrun rank > 0: rank 0 reports
        return 0
    for r in summary["rows"]:
        print(f"{r['checkpoint']}  {r['metric']}: {fmt(r['value'])}  (n={r['num_samples']})")
    print(f"wrote {os.path.join(args.out, summary['files']['csv'])}, summary.json, report.md and "
          f"{len(summary['files']['figures'])} figure files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
