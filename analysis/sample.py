"""`python -m analysis.sample`: draw samples of a checkpoint (or every checkpoint of a run) into a folder.

Thin command line over :func:`repa_probe.analysis.generation.generate.sample_checkpoints`; see `--help`.
"""
from __future__ import annotations

import argparse
from typing import List, Optional

from analysis.common import add_checkpoint_options
from repa_probe.analysis.errors import AnalysisInputError
from repa_probe.errors import OneLineParser, add_debug_flags, one_line_errors, setup_logging

DESCRIPTION = """\
Sample images from a diffusion transformer: our checkpoints, a run directory (every checkpoint), or an
official DiT / SiT / REPA file. Writes {index:06d}.png, samples.npz (ADM layout: arr_0 uint8 N x H x W x 3,
the input of ADM's evaluator and of `python -m analysis.fid`), grid.png and sampling.json.

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
    p = OneLineParser(prog="python -m analysis.sample", description=DESCRIPTION, epilog=EXAMPLES,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", action="append", required=True, metavar="PATH",
                   help="checkpoint file, run directory or its checkpoints/ folder (repeatable)")
    p.add_argument("--out", required=True, metavar="DIR", help="sample folder (one subfolder per checkpoint "
                   "when there are several)")
    add_sampler_args(p)
    g = p.add_argument_group("running")
    g.add_argument("--batch-size", type=int, default=256, help="samples per batch per process (default 256)")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_debug_flags(g)
    return p


def add_sampler_args(p: argparse.ArgumentParser) -> None:
    """Sampler options shared with `python -m analysis.fid`."""
    g = p.add_argument_group("sampler")
    g.add_argument("--num-samples", type=int, metavar="N", help="number of samples")
    g.add_argument("--method", choices=("euler", "heun", "sde", "ddpm", "ddim"),
                   help="sampler (default: euler for flow models, as REPA's generate.py; ddpm for DiT)")
    g.add_argument("--steps", type=int, help="sampling steps (default: euler 50, ddpm 250)")
    g.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance w (default 1: off)")
    g.add_argument("--guidance-low", type=float, default=0.0, help="guidance interval start, REPA time")
    g.add_argument("--guidance-high", type=float, default=1.0, help="guidance interval end, REPA time")
    g.add_argument("--cfg-channels", default="auto", help="guided channels: auto (repa models all, DiT and "
                   "official SiT the first 3, as their forward_with_cfg), "
                   "all, or a number k (the first k)")
    g.add_argument("--cls-cfg-scale", type=float, default=None, help="REG models: guidance of the class token, "
                   "applied where the image is guided (default: --cfg-scale; <= 0: its conditional velocity)")
    g.add_argument("--timestep-shift", type=float, default=0.0, metavar="S",
                   help="LightningDiT's shifted grid for euler / heun: t -> t / (S + (1 - S) t) in REPA time "
                        "(theirs: 0.3; default 0 = off)")
    g.add_argument("--labels", default="balanced", choices=("balanced", "random"),
                   help="class labels: balanced (i mod K, default) or random (uniform, REPA's protocol)")
    g.add_argument("--seed", type=int, default=0, help="sample i is seeded by (seed, i); default 0")
    add_checkpoint_options(g)
    g.add_argument("--vae", metavar="NAME", help="VAE decoder (default: the run's; sd-vae-ft-ema for 4-channel "
                   "official models; none in pixel space)")


def sampler_kwargs(args) -> dict:
    channels = args.cfg_channels
    channels = int(channels) if str(channels).isdigit() else channels
    return dict(method=args.method, steps=args.steps, cfg_scale=args.cfg_scale, guidance_low=args.guidance_low,
                guidance_high=args.guidance_high, labels=args.labels, seed=args.seed, cfg_channels=channels,
                cls_cfg_scale=args.cls_cfg_scale, timestep_shift=args.timestep_shift,
                time_convention=args.time_convention, encoder_depth=args.encoder_depth, weights=args.weights,
                vae=args.vae)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    # the library (torch, data, plotting) is imported after parsing: --help and usage errors stay instant
    from repa_probe.analysis.generation.generate import sample_checkpoints

    setup_logging(args.verbose)
    with one_line_errors(args.debug):
        if args.num_samples is None:
            raise AnalysisInputError("--num-samples is required (50000 for FID-50K)")
        done = sample_checkpoints(args.ckpt, args.out, num_samples=args.num_samples, batch_size=args.batch_size,
                                  device=args.device, progress=not args.quiet, **sampler_kwargs(args))
    for d in done:  # empty on torchrun ranks > 0
        print(f"{d.entry.label}: {d.settings.num_samples} samples ({d.settings.method}, {d.settings.steps} steps) "
              f"in {d.folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
