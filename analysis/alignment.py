"""`python -m analysis.alignment`: CKNNA (and friends) between diffusion-transformer blocks and a frozen encoder.

Thin command line over :func:`repa_probe.analysis.alignment.run_alignment`; see `--help`.
"""
from __future__ import annotations

import argparse
import os
from typing import List, Optional

from analysis.common import add_checkpoint_options, add_running_options
from repa_probe.analysis.core.options import METRICS, TARGET_KINDS
from repa_probe.errors import OneLineParser, add_debug_flags, one_line_errors, setup_logging
from repa_probe.timesteps import TIME_HELP
from repa_probe.reports.numbers import fmt_interval

DESCRIPTION = """\
Measure how well each block of a diffusion transformer (our checkpoints, official DiT / SiT / REPA
files, or every checkpoint of a run) aligns with a frozen target encoder, per block and noise level.

For each checkpoint, block and timestep t, the block output on the noisy image x_t is averaged over
tokens and compared with the encoder's representation of the clean image (platonic-rep preparation on
both sides: outlier clamp at the 0.95 quantile, row L2 norm; CKNNA with k=10 by default). The noise of
each image is fixed by (--seed, dataset index), so all checkpoints see identical inputs.

{time_help}

With only --ckpt and --out, dataset, encoder, VAE and objective come from our checkpoint's training config
(the dataset's held-out 'val' split when it has one). Official checkpoints need --data and --encoder.

Outputs in --out: alignment.csv (checkpoint, step, layer, timestep, metric, value, ci_low, ci_high, n),
summary.json (best block per checkpoint/timestep/metric, settings, versions), options.json (the resolved
options), report.md (the headline numbers), replicates.npz (with --bootstrap) and figures/ (PDF + PNG).
"""

EXAMPLES = """\
examples:
  python -m analysis.alignment --ckpt runs/tiny/checkpoints/0000300.pt --out results/align
  python -m analysis.alignment --ckpt runs/repa_sit_b --ckpt runs/sit_b --timesteps 0,0.5 --out results/cmp
  python -m analysis.alignment --ckpt SiT-XL-2-256.pt --time-convention sit --data imagefolder \\
      --data-root /data/imagenet --encoder dinov2_vitb14 --num-samples 10000 --out results/sit_xl
"""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m analysis.alignment", description=DESCRIPTION.format(time_help=TIME_HELP),
                      epilog=EXAMPLES,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", action="append", required=True, metavar="PATH",
                   help="checkpoint file (ours, or official DiT/SiT/REPA), or a run directory / its checkpoints/ "
                        "folder (every checkpoint, by step: alignment over training). Repeat to compare.")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    g = p.add_argument_group("data and target")
    g.add_argument("--data", metavar="NAME|DIR", help="dataset name (shapes, digits, imagefolder, repa, shards) or "
                   "an image directory; default: the training config's dataset")
    g.add_argument("--data-root", metavar="DIR", help="dataset root for --data imagefolder/repa/shards")
    g.add_argument("--split", default="auto", choices=("auto", "train", "val", "test"),
                   help="dataset split; auto = 'val' (held out) when the dataset has it, else 'train'")
    g.add_argument("--num-samples", type=int, metavar="N",
                   help="images to use (default: min(10000, dataset size); procedural shapes: 512)")
    g.add_argument("--encoder", metavar="NAME", help="target encoder (dinov2_vitb14, dinov2_vitl14_reg, tiny_vit, "
                   "...); default: the training config's encoder")
    g.add_argument("--encoder-weights", metavar="FILE", help="local encoder weights (.pth/.safetensors); without it "
                   "the torch hub / HF caches are searched (offline: an error names what to set)")
    g.add_argument("--random-encoder", action="store_true",
                   help="random-initialised --encoder seeded with --seed (tests / baselines only)")
    g.add_argument("--target-kind", default="cls", choices=TARGET_KINDS,
                   help="encoder representation: cls (final-norm CLS token, default: platonic-rep compares "
                        "vision models by their CLS token) or mean_patch (mean of the final-norm patch tokens)")
    g.add_argument("--vae", metavar="NAME", help="VAE for latent models (stabilityai/sd-vae-ft-ema, a local dir, "
                   "none); default: the training config's, else sd-vae-ft-ema for 4-channel official models")
    add_checkpoint_options(g)
    g.add_argument("--labels", default="null", choices=("null", "true"),
                   help="class fed to the model: null (unconditional, default) or the dataset's true labels")
    g = p.add_argument_group("what to measure")
    g.add_argument("--layers", default="all", help="'all' or 1-based block numbers, e.g. 1,4,8 (8 = REPA's "
                   "encoder_depth 8); 'latent' adds layer 0, the clean VAE latent tokens as the model sees them "
                   "(compare latent spaces: SD-VAE, REPA-E's E2E-VAE, VA-VAE)")
    g.add_argument("--timesteps", default="0,0.25,0.5,0.75,1",
                   help="comma list of times t in [0, 1] or step:N (see Time above; default: %(default)s)")
    g.add_argument("--metric", default="cknna", help=f"one or more of {', '.join(METRICS)} and the spatial-structure "
                   "metrics lds, cds, srss, rmsc (iREPA; rows per block x timestep plus layer=target for the "
                   "encoder's patch tokens) (comma list; default cknna)")
    g.add_argument("--topk", type=int, default=10, help="k of the kNN metrics (default 10, platonic-rep's)")
    g.add_argument("--bootstrap", type=int, default=0, metavar="B", help="half-sampling (CKNNA, ...) / bootstrap "
                   "(spatial metrics) replicates for 95%% intervals, kept in replicates.npz for the comparisons of a "
                   "study report (0 = off; e.g. 100)")
    g = p.add_argument_group("running")
    add_running_options(g, batch_size=256)
    g.add_argument("--plot-timestep", metavar="T", help="timestep of the cross-checkpoint figures (default: the "
                   "one nearest 0.5)")
    g.add_argument("--cache-dir", default=os.environ.get("REPA_PROBE_CACHE", "~/.cache/repa_probe/features"),
                   help="where encoder features are cached across runs (default: $REPA_PROBE_CACHE or "
                        "%(default)s)")
    g.add_argument("--no-cache", action="store_true", help="do not read or write the encoder-feature cache")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_debug_flags(g)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    # the library (torch, data, plotting) is imported after parsing: --help and usage errors stay instant
    from repa_probe.analysis.alignment.run import AlignmentOptions, run_alignment

    setup_logging(args.verbose)
    with one_line_errors(args.debug):
        options = AlignmentOptions.from_namespace(
            args, cache_dir=None if args.no_cache else os.path.expanduser(args.cache_dir), progress=not args.quiet)
        summary = run_alignment(args.ckpt, args.out, options)
    plot_t = summary["settings"]["plot_timestep"]
    for b in (b for b in summary["best"] if b["timestep"] == plot_t):
        print(f"{b['checkpoint']}  t={b['timestep']}  {b['metric']}: best block {b['best_layer']} "
              f"({fmt_interval(b['value'], b['ci_low'], b['ci_high'])})")
    print(f"wrote {os.path.join(args.out, 'alignment.csv')}, summary.json, report.md and "
          f"{len(summary['files']['figures'])} figure files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
