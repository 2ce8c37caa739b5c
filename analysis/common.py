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
