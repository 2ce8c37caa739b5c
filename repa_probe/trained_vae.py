"""The VAE of an end-to-end (REPA-E) run: read from its checkpoint, exported as a diffusers folder.

A REPA-E checkpoint holds the tuned VAE (ours: ``vae`` in diffusers' keys + ``vae_config``; REPA-E's
``train_repae.py``: ``vae`` in the CompVis LDM layout) and, in its diffusion model's BatchNorm (``ema`` preferred,
as REPA-E's ``save_vae_weights.py``), the statistics its latents are normalised with. :func:`load_checkpoint_vae`
returns a :class:`~repa_probe.encoders.vae.LatentVAE` normalised exactly as that model's BatchNorm in eval mode
(``(raw - mean) / sqrt(var + eps)``, de-normalised with ``sqrt(var)`` as REPA-E's ``generate.py``);
:func:`load_any_vae` also takes everything ``load_vae`` takes; :func:`export_vae` writes a diffusers
``AutoencoderKL`` folder plus ``latents_stats.pt`` (REPA-E's ``{latents_scale, latents_bias}``, (1, C, 1, 1)),
which ``load_vae`` (``vae.name=DIR``, ``--vae DIR``) and diffusers itself open.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch

from repa_probe.checkpoint import CheckpointError, safe_load
from repa_probe.encoders.vae import STATS_FILE, LatentVAE, load_vae
from repa_probe.models.latent_norm import BN_EPS
from repa_probe.models.layout import is_state_dict, normalize_keys


def checkpoint_file(path: str | os.PathLike) -> Path:
    """A checkpoint file itself, or the newest ``{step}.pt`` of a run directory or its ``checkpoints/``."""
    p = Path(path)
    if p.is_file():
        return p
    folder = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    files = sorted((f for f in folder.glob("*.pt") if f.stem.isdigit()), key=lambda f: int(f.stem))
    if not files:
        raise CheckpointError(f"{path}: no checkpoint file and no {{step}}.pt checkpoints in it")
    return files[-1]


def is_training_checkpoint_with_vae(obj) -> bool:
    return isinstance(obj, Mapping) and isinstance(obj.get("vae"), Mapping) and ("ema" in obj or "model" in obj)


def _diffusers_vae(obj: Mapping, path: Path):
    from diffusers import AutoencoderKL

    from repa_probe.encoders.ldm_vae import LDMLayoutError, build_from_ldm, is_ldm_vae

    sd = obj["vae"]
    if "vae_config" in obj:  # ours
        vae = AutoencoderKL(**obj["vae_config"])
        vae.load_state_dict({k: v.float() for k, v in sd.items()})
        return vae
    sd = normalize_keys(sd)
    if not is_ldm_vae(sd):
        raise CheckpointError(f"{path}: its 'vae' entry is neither ours (with vae_config) nor an LDM-layout VAE")
    try:
        return build_from_ldm(sd)
    except LDMLayoutError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def _model_weights(obj, prefer_ema: bool) -> dict:
    """The diffusion model's state dict in a loaded file (``ema`` or ``model`` entry, or a plain state dict),
    without a ``module.`` / ``_orig_mod.`` prefix; {} when it is none of these."""
    if isinstance(obj, Mapping) and any(isinstance(obj.get(k), Mapping) for k in ("ema", "model")):
        obj = obj["ema"] if prefer_ema and isinstance(obj.get("ema"), Mapping) else obj["model"]
    return normalize_keys(obj) if is_state_dict(obj) else {}


def load_checkpoint_vae(path: str | os.PathLike, prefer_ema: bool = True) -> LatentVAE:
    """The tuned VAE of a REPA-E checkpoint (file or run directory), normalised by its model's BatchNorm."""
    file = checkpoint_file(path)
    obj = safe_load(file)
    if not is_training_checkpoint_with_vae(obj):
        raise CheckpointError(f"{file}: not an end-to-end (REPA-E) checkpoint: it holds no VAE")
    weights = _model_weights(obj, prefer_ema)
    if "bn.running_mean" not in weights:
        raise CheckpointError(f"{file}: its model has no latent BatchNorm (bn.*) to normalise the VAE's latents")
    vae = LatentVAE(_diffusers_vae(obj, file), str(file))
    return vae.with_batchnorm(weights["bn.running_mean"], weights["bn.running_var"], BN_EPS)


def checkpoint_vae(path: str | os.PathLike, vae_name: str | None, prefer_ema: bool = True,
                   tuned: bool = True) -> LatentVAE | None:
    """The VAE a checkpoint's model reads its latents with: a REPA-E checkpoint's tuned VAE (``tuned``), else
    ``vae_name`` (``load_any_vae``); when the model has REPA-E's latent BatchNorm, normalised by its statistics
    (the weights ``prefer_ema`` picks, as ``load_model``)."""
    obj = safe_load(path)
    if tuned and is_training_checkpoint_with_vae(obj):
        return load_checkpoint_vae(path, prefer_ema)
    vae = load_any_vae(vae_name)
    weights = _model_weights(obj, prefer_ema)
    if vae is None or "bn.running_mean" not in weights:
        return vae
    return vae.with_batchnorm(weights["bn.running_mean"], weights["bn.running_var"], BN_EPS)


def load_any_vae(spec: str | os.PathLike | None, device=None) -> LatentVAE | None:
    """``load_vae``'s names, plus a REPA-E checkpoint file or run directory (its tuned VAE)."""
    if spec is not None and str(spec).lower() != "none" and not str(spec).startswith("random:"):
        p = Path(os.path.expanduser(str(spec)))
        run = p.is_dir() and ((p / "checkpoints").is_dir() or any(f.stem.isdigit() for f in p.glob("*.pt")))
        if run or (p.is_file() and is_training_checkpoint_with_vae(_peek(p))):
            vae = load_checkpoint_vae(p)
            return vae if device is None else vae.to(device)
    return load_vae(spec, device=device)


def _peek(path: Path):
    try:
        return safe_load(path)
    except CheckpointError:
        return None  # not a checkpoint: load_vae reports what it is


def export_vae(path: str | os.PathLike, out_dir: str | os.PathLike, prefer_ema: bool = True) -> Path:
    """Write the tuned VAE of a REPA-E checkpoint as a diffusers folder with ``latents_stats.pt``."""
    vae = load_checkpoint_vae(path, prefer_ema)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vae.vae.save_pretrained(out)
    torch.save(vae.latent_stats(), out / STATS_FILE)
    return out
