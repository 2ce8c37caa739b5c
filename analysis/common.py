"""Flags shared by the analysis command lines (each maps to the field of the same name in
:class:`repa_probe.analysis.core.options.AnalysisOptions`)."""
from __future__ import annotations

import argparse

from repa_probe.timesteps import CONVENTIONS, FAMILY_CONVENTIONS


def add_checkpoint_options(g) -> None:
    """``--weights``, ``--time-convention`` (alias ``--family``) and ``--encoder-depth``."""
    g.add_argument("--weights", default="auto", choices=("auto", "ema", "model"),
                   help="which weights of a training checkpoint: ema, model, or auto (EMA unless it still "
                        "weighs the initialisation by more than half: ema_decay**step > 0.5)")
    g.add_argument("--time-convention", choices=CONVENTIONS, metavar="{repa,sit,ddpm}",
                   help="time convention of plain official state dicts whose shapes read as DiT: sit for an official "
                        "SiT file (t=0 noise; it looks like DiT's), ddpm (DiT, the default). Files that show theirs "
                        "(ours, training files with args, REPA files with projectors) keep it")
    g.add_argument("--family", dest="time_convention", type=lambda v: FAMILY_CONVENTIONS.get(v, v),
                   choices=CONVENTIONS, metavar="{REPA,SiT,DiT}",
                   help="the same by code base: REPA = repa, SiT = sit, DiT = ddpm")
    g.add_argument("--encoder-depth", type=int, metavar="N",
                   help="1-based block read by the REPA projector of official files whose shapes do not tell "
                        "(plain REPA state dicts; default: the training args', else 8; REPA's B/2 recipe uses 4). "
                        "Our checkpoints keep their stored depth")


def add_running_options(g: argparse._ArgumentGroup, batch_size: int) -> None:
    """``--seed``, ``--batch-size``, ``--device``."""
    g.add_argument("--seed", type=int, default=0, help="noise seed (and random-encoder / probe seed); default 0")
    g.add_argument("--batch-size", type=int, default=batch_size,
                   help=f"images per forward pass (default {batch_size})")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")


def add_sampler_options(p: argparse.ArgumentParser) -> None:
    """The sampler's flags (fields of :class:`repa_probe.analysis.generation.options.SampleOptions`), shared by
    `python -m analysis.sample` and `python -m analysis.fid`."""
    g = p.add_argument_group("sampler")
    g.add_argument("--num-samples", type=int, metavar="N", help="number of samples per checkpoint")
    g.add_argument("--method", choices=("euler", "heun", "sde", "ddpm", "ddim"),
                   help="sampler (default: euler for flow models, as REPA's generate.py; ddpm for DiT)")
    g.add_argument("--steps", type=int, help="sampling steps (default: euler 50, ddpm 250)")
    g.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance w (default 1: off)")
    g.add_argument("--guidance-low", type=float, default=0.0, help="guidance interval start, REPA time in [0, 1]")
    g.add_argument("--guidance-high", type=float, default=1.0, help="guidance interval end, REPA time in [0, 1]")
    g.add_argument("--cfg-channels", default="auto", help="guided channels: auto (repa models all, DiT and "
                   "official SiT the first 3, as their forward_with_cfg), all, or a number k (the first k)")
    g.add_argument("--cls-cfg-scale", type=float, default=None, help="REG models: guidance of the class token, "
                   "applied where the image is guided (default: --cfg-scale; <= 0: its conditional velocity)")
    g.add_argument("--timestep-shift", type=float, default=0.0, metavar="S",
                   help="LightningDiT's shifted grid for euler / heun: t -> t / (S + (1 - S) t) in REPA time "
                        "(theirs: 0.3; default 0 = off)")
    g.add_argument("--labels", default="balanced", choices=("balanced", "random"),
                   help="class labels: balanced (i mod K, default) or random (uniform, REPA's protocol)")
    g.add_argument("--seed", type=int, default=0, help="sample i is seeded by (seed, i); default 0")
    add_checkpoint_options(g)
    g.add_argument("--vae", metavar="NAME", help="VAE decoder (default: the run's; for files without a config "
                   "the default of the model's latent channels, sd-vae-ft-ema for 4; none in pixel space)")
