"""`python -m analysis.sample`: draw samples of a checkpoint (or every checkpoint of a run) into a folder.

Thin command line over :func:`repa_probe.analysis.generation.run.sample_checkpoints`; see `--help`.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Optional

from repa_probe.errors import OneLineParser, add_debug_flags, setup_logging

DESCRIPTION = """\
Sample images from a diffusion transformer: our checkpoints, a run directory (every checkpoint), or an
official DiT / SiT / REPA file. Writes {index:06d}.png, samples.npz (ADM layout: arr_0 uint8 N x H x W x 3,
the input of ADM's evaluator and of `python -m analysis.fid`), grid.png and sampling.json per folder, and
sample.csv (one row per folder), summary.json and options.json in --out.

Sample i is seeded by (--seed, i): it is reproducible alone, whatever the batch size or the number of
processes. An interrupted run resumes where it stopped (same --out and settings). Under torchrun
(`torchrun --nproc_per_node=8 -m analysis.sample ...`) the indices are sharded over the GPUs; bf16 on GPU.

Samplers: flow models (ours, REPA, SiT) euler (default, 50 steps, as REPA's generate.py) | heun (REPA's
euler_sampler) | sde (REPA's Euler-Maruyama; the paper's FID protocol is --method sde --steps 250); DiT ddpm
(default, 250 respaced steps, learned variance) | ddim. Guidance: w (--cfg-scale)
applied for t in [--guidance-low, --guidance-high] (REPA time, t = 1 noise); REPA's best: 1.8 on t <= 0.7.
"""

EXAMPLES = """\
examples:
  python -m analysis.sample --ckpt runs/tiny/checkpoints/0000200.pt --num-samples 64 --steps 50 --out samples/tiny
  python -m analysis.sample --ckpt last.pt --cfg-scale 1.8 --guidance-high 0.7 --labels random \\
      --num-samples 50000 --batch-size 64 --out samples/repa_xl
"""


def build_parser() -> argparse.ArgumentParser:
    from analysis.common import add_sampler_options

    p = OneLineParser(prog="python -m analysis.sample", description=DESCRIPTION, epilog=EXAMPLES,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", action="append", required=True, metavar="PATH",
                   help="checkpoint file, run directory or its checkpoints/ folder (repeatable)")
    p.add_argument("--out", required=True, metavar="DIR", help="sample folder (one subfolder per checkpoint "
                   "when there are several)")
    add_sampler_options(p)
    g = p.add_argument_group("running")
    g.add_argument("--batch-size", type=int, default=256, help="samples per batch per process (default 256)")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_debug_flags(g)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from repa_probe.analysis.generation.options import SampleOptions
    from repa_probe.analysis.generation.run import sample_checkpoints
    from repa_probe.errors import one_line_errors

    with one_line_errors(args.debug):
        options = SampleOptions.from_namespace(args, progress=not args.quiet)
        options.need_num_samples()
        summary = sample_checkpoints(args.ckpt, args.out, options)
    if summary["files"] is None:  # torchrun rank > 0: rank 0 reports
        return 0
    for r in summary["rows"]:
        print(f"{r['checkpoint']}: {r['num_samples']} samples ({r['method']}, {r['steps']} steps) in "
              f"{Path(args.out) / r['folder']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
