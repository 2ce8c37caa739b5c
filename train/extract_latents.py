"""`python -m train.extract_latents`: encode an image dataset with a VAE into REPA's preprocessed layout.

Writes ``OUT/images/{idx[:5]}/img{idx:08d}.png`` and ``OUT/vae-sd/{idx[:5]}/img-mean-std-{idx:08d}.npy``
(posterior mean ‖ std, float32, 8×h×w) with ``dataset.json`` label files: the layout REPA's ``train.py`` reads,
and what ``data.name=repa data.root=OUT`` trains on (the posterior is re-sampled at every step). ``--vae`` also
takes the VAE tuned by an end-to-end (REPA-E) run: its run directory or checkpoint, or the folder
``train.export_vae`` wrote; train the second stage with the same ``vae.name`` (its latent statistics).
"""
from __future__ import annotations

import argparse
from typing import List, Optional

from repa_probe.errors import OneLineParser, add_debug_flags, one_line_errors, setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m train.extract_latents", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="imagefolder",
                   help="dataset name: imagefolder (ImageNet layout, ADM centre crop), shapes or digits")
    p.add_argument("--data-root", default=None, help="image folder root (for imagefolder)")
    p.add_argument("--split", default="train", help="dataset split (root/<split> is used when it exists)")
    p.add_argument("--resolution", type=int, default=256, help="image side after the centre crop (pixels)")
    p.add_argument("--num-samples", type=int, default=None, help="cap on the number of images (default: all)")
    p.add_argument("--out", required=True, help="output directory (gets images/ and vae-sd/)")
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-mse",
                   help="VAE: a diffusers repo id in the local HF cache, a local diffusers folder (e.g. from "
                        "train.export_vae), an LDM .pt with its -latents-stats.pt, a REPA-E run directory or "
                        "checkpoint (its tuned VAE), or random:tiny")
    p.add_argument("--batch-size", type=int, default=32, help="images per VAE forward pass")
    p.add_argument("--num-workers", type=int, default=4, help="DataLoader worker processes")
    p.add_argument("--flip", action="store_true", help="also store horizontally flipped copies (2N items)")
    p.add_argument("--no-images", action="store_true", help="do not write the PNGs (latents only)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory's files")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    add_debug_flags(p)
    return p


def _check_flags(args) -> None:
    """Numbers that mean nothing (0 or negative) and an --out that is a file: one line naming the flag."""
    from pathlib import Path

    from repa_probe.encoders.vae import VAEInputError

    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--num-workers", args.num_workers, 0),
                             ("--resolution", args.resolution, 1), ("--num-samples", args.num_samples, 1)):
        if value is not None and value < low:
            raise VAEInputError(f"{flag} must be an integer >= {low}, got {value}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise VAEInputError(f"--out {args.out} is a file, not a folder; name a folder (it is created)")


def _in_flags(exc: Exception) -> str:
    """A loader's message in this command's flags (the loaders name the training keys)."""
    msg = str(exc)
    for key, flag in (("vae.name=", "--vae "), ("needs root=", "needs --data-root"), ("root ", "--data-root "),
                      ("build_dataset(", "--data (")):
        msg = msg.replace(key, flag)
    return msg


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    # the library (torch, data, plotting) is imported after parsing: --help and usage errors stay instant
    from repa_probe.data import DatasetError, build_dataset
    from repa_probe.devices import resolve_device
    from repa_probe.encoders.vae import VAEInputError, VAEWeightsError, extract_latents
    from repa_probe.trained_vae import load_any_vae

    setup_logging(args.verbose)

    with one_line_errors(args.debug):
        _check_flags(args)
        device = resolve_device(args.device)
        try:
            dataset = build_dataset(args.data, root=args.data_root, split=args.split, resolution=args.resolution,
                                    num_samples=args.num_samples)
            vae = load_any_vae(args.vae, device=device)
        except DatasetError as exc:
            raise DatasetError(_in_flags(exc)) from None
        except VAEWeightsError as exc:
            raise VAEWeightsError(_in_flags(exc)) from None
        if vae is None:
            raise VAEInputError("--vae none has no latents to extract; name a VAE")
        if args.resolution % vae.downsample_factor:
            raise VAEInputError(f"--resolution {args.resolution} is not a multiple of {vae.downsample_factor}, the "
                                f"downsampling factor of --vae {args.vae}")
        out = extract_latents(dataset, vae, args.out, batch_size=args.batch_size, flip=args.flip,
                              save_images=not args.no_images, num_workers=args.num_workers,
                              overwrite=args.overwrite)
    print(f"done: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
