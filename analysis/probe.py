"""`python -m analysis.probe`: linear classification probes on the hidden states of diffusion transformers.

Thin command line over :func:`repa_probe.analysis.probes.run.run_probes`; see `--help`. `analysis.segment` reuses
this parser for the segmentation probe.
"""
from __future__ import annotations

import argparse
import os
from typing import List, Optional

from analysis.common import add_checkpoint_options, add_running_options
from repa_probe.errors import OneLineParser, add_debug_flags, one_line_errors, setup_logging
from repa_probe.timesteps import TIME_HELP

DESCRIPTIONS = {
    "linear": """\
Linear classification probes on every block of a diffusion transformer, per noise level.

For each checkpoint, block and timestep t, the block output on the noisy image x_t (model fed its null
class) is mean-pooled over tokens, standardised with training-split statistics, and a linear classifier
is fitted on the train split (hyper-parameters chosen on a held-out 20% of it) and scored on the test
split: top-1 accuracy, and top-5 when there are more than 5 classes. --encoder-reference adds the target
encoder's own CLS and mean-patch features as dashed reference lines. A run trained on the built-in shapes is
probed on digits unless --data says otherwise (shapes classes are not linearly separable, even in pixels).
""",
    "segmentation": """\
Linear segmentation probes (DINOv2 "lin.") on every block of a diffusion transformer, per noise level.

For each checkpoint, block and timestep t, the patch tokens of the noisy image x_t (model fed its null
class) go through BatchNorm (no affine) and a 1x1 convolution; the logits are bilinearly upsampled to the
mask resolution and trained with per-pixel cross-entropy (255 = ignored), keeping the epoch with the best
mIoU on 10% of the training images held out (stops after 2 epochs without a gain). Scored by mIoU (classes absent
from both prediction and ground truth excluded, mmseg convention) and pixel accuracy on the test split.
--encoder-reference adds the target encoder's patch tokens as a dashed reference line.
""",
}
COMMON = """
{time_help}

With only --ckpt and --out, dataset, VAE, encoder and objective come from our checkpoint's training
config. Official checkpoints need --data (and --encoder for --encoder-reference).

Outputs in --out: {prefix}.csv (checkpoint, step, source, layer, timestep, metric, value, num_train,
num_test), summary.json (settings, rows, every probe's chosen hyper-parameters), options.json (the resolved
options), report.md (the headline numbers), replicates.npz (linear probes) and figures/ (PDF + PNG).
"""
DATASETS = {"linear": "shapes | digits | imagefolder DIR (ImageNet layout: DIR/train, DIR/val)",
            "segmentation": "shapes | voc DIR (Pascal VOC 2012) | ade20k DIR (ADEChallengeData2016)"}
PROGS = {"linear": "analysis.probe", "segmentation": "analysis.segment"}
EXAMPLES = {
    "linear": """\
examples:
  python -m analysis.probe --ckpt runs/tiny/checkpoints/0000300.pt --out results/probe
  python -m analysis.probe --ckpt runs/repa_sit_b --ckpt runs/sit_b --layers 2,4,6,8 --timesteps 0,0.5 \\
      --data imagefolder /data/imagenet --num-train 50000 --backend torch --encoder-reference --out results/lin
""",
    "segmentation": """\
examples:
  python -m analysis.segment --ckpt runs/tiny/checkpoints/0000300.pt --out results/seg
  python -m analysis.segment --ckpt runs/repa_sit_b/checkpoints/0400000.pt --data voc /data/VOCdevkit \\
      --layers 4,8,12 --timesteps 0,0.25 --encoder-reference --out results/voc
""",
}


def build_parser(task: str = "linear") -> argparse.ArgumentParser:
    common = COMMON.format(time_help=TIME_HELP, prefix="probe" if task == "linear" else "segment")
    p = OneLineParser(prog=f"python -m {PROGS[task]}", description=DESCRIPTIONS[task] + common,
                      epilog=EXAMPLES[task], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", action="append", required=True, metavar="PATH",
                   help="checkpoint file (ours, or official DiT/SiT/REPA), or a run directory (every checkpoint). "
                        "Repeat to overlay several checkpoints.")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", metavar=("NAME", "DIR"), help=f"{DATASETS[task]}; default: the training "
                   "config's dataset")
    g.add_argument("--data-root", metavar="DIR", help="dataset folder (same as the DIR of --data)")
    g.add_argument("--num-train", type=int, metavar="N", help="training images for the probe (default: the whole "
                   "train split; shapes 2000)")
    g.add_argument("--num-test", type=int, metavar="N", help="test images (default: the whole held-out split; "
                   "shapes 500)")
    g.add_argument("--vae", metavar="NAME", help="VAE of latent models; default: the training config's")
    add_checkpoint_options(g)
    g = p.add_argument_group("what to probe")
    g.add_argument("--layers", default="all", help="'all' or 1-based block numbers, e.g. 1,4,8; 'latent' = the clean latent "
                   "tokens (layer 0), e.g. latent,1,4")
    g.add_argument("--timesteps", default="0,0.25,0.5",
                   help="comma list of times t in [0, 1] or step:N (see Time above; default: %(default)s)")
    if task == "linear":
        g.add_argument("--backend", default="sklearn", choices=("sklearn", "torch"),
                       help="sklearn: logistic regression (L-BFGS, C sweep); torch: AdamW linear head (lr x weight "
                            "decay sweep, streams mini-batches, GPU when available)")
    g.add_argument("--epochs", type=int, metavar="E", help="training epochs of the torch probe / most epochs of the "
                   "segmentation probe (default 30 / 10)")
    g.add_argument("--encoder-reference", action="store_true", help="also probe the target encoder's own features "
                   "(dashed line)")
    g.add_argument("--encoder", metavar="NAME", help="reference encoder (dinov2_vitb14, tiny_vit, ...); default: the "
                   "training config's encoder")
    g.add_argument("--encoder-weights", metavar="FILE", help="local weights of --encoder")
    g.add_argument("--random-encoder", action="store_true", help="random-initialised --encoder (tests only)")
    g = p.add_argument_group("running")
    add_running_options(g, batch_size=64)
    g.add_argument("--max-feature-gb", type=float, default=4.0, help="features held in memory per extraction pass "
                   "(default 4; more layers take more passes)")
    g.add_argument("--bootstrap", type=int, default=200, metavar="B", help="replicates over test images for 95%% "
                   "intervals of linear-probe accuracy (replicates.npz, report.md; default 200, 0 = off)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_debug_flags(g)
    return p


def main(argv: Optional[List[str]] = None, task: str = "linear") -> int:
    p = build_parser(task)
    args = p.parse_args(argv)
    # the library (torch, data, plotting) is imported after parsing: --help and usage errors stay instant
    from repa_probe.analysis.probes.run import ProbeOptions, run_probes

    if args.data and len(args.data) > 2:
        p.error(f"--data takes a name and at most one directory, got {' '.join(args.data)}")
    data, root = (args.data + [None])[:2] if args.data else (None, None)
    setup_logging(args.verbose)
    with one_line_errors(args.debug):
        options = ProbeOptions.from_namespace(args, task=task, data=data, data_root=root or args.data_root,
                                              progress=not args.quiet)
        summary = run_probes(args.ckpt, args.out, options)
    print(f"wrote {os.path.join(args.out, summary['files']['csv'])}, summary.json, options.json, report.md and "
          f"{len(summary['files']['figures'])} figure files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
