"""`python -m train.export_vae`: the VAE tuned by an end-to-end (REPA-E) run as a diffusers folder.

Writes ``OUT/config.json`` + ``OUT/diffusion_pytorch_model.safetensors`` (diffusers ``AutoencoderKL``) and
``OUT/latents_stats.pt`` (REPA-E's ``{latents_scale, latents_bias}``, (1, C, 1, 1), from the EMA model's
BatchNorm, as REPA-E's ``save_vae_weights.py``). ``--ckpt`` takes our checkpoints, a run directory (its newest
checkpoint) or REPA-E's ``train_repae.py`` checkpoints. Then ``--vae OUT`` (extract_latents, the analyses),
``vae.name=OUT`` (training) and ``diffusers.AutoencoderKL.from_pretrained(OUT)`` open it.
"""
from __future__ import annotations

import argparse
from typing import List, Optional

from repa_probe.errors import OneLineParser, add_debug_flags, setup_logging


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    from repa_probe.errors import one_line_errors
    from repa_probe.trained_vae import export_vae

    with one_line_errors(args.debug):
        print(f"done: {export_vae(args.ckpt, args.out, prefer_ema=args.weights == 'ema')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m train.export_vae", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="REPA-E checkpoint file or run directory (newest checkpoint)")
    p.add_argument("--out", required=True, help="output folder (diffusers AutoencoderKL + latents_stats.pt)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema",
                   help="whose BatchNorm statistics normalise the latents (default: ema, as REPA-E)")
    add_debug_flags(p)
    return p


if __name__ == "__main__":
    raise SystemExit(main())
