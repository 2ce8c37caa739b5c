"""The VAE's own training losses in REPA-E's end-to-end step: L1, LPIPS, KL and the adversarial term.

``vae_loss_terms`` follows REPA-E's ``ReconstructionLoss_Single_Stage._forward_generator`` (its
``configs/l1_lpips_kl_gan.yaml``): ``L1 / exp(logvar)`` (logvar fixed at 0) + ``perceptual_weight`` · LPIPS +
``kl_weight`` · KL (summed over latent elements, / batch) + ``disc_weight`` · (−mean D(x̂)) from ``disc_start``
on (no adaptive weight), in float32. Images are in [-1, 1], as REPA-E feeds them; its LPIPS then maps them
with ``2x − 1`` (its code assumes [0, 1] inputs), and so does :class:`LPIPS` here, to match its numbers.

LPIPS needs real weights: the VGG16 features (torchvision layout ``features.N.*`` or LPIPS' ``net.sliceK.N.*``)
and the five linear layers (``lin{k}.model.1.weight``, the ``vgg.pth`` of taming-transformers / the ``lpips``
package). Without them :func:`load_lpips` raises a one-line error naming the config key; it never runs random.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from repa_probe.errors import ReproError

_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))  # VGG16 features up to relu1_2, ..., relu5_3
_CHANNELS = (64, 128, 256, 512, 512)
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
VGG_HUB_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16 in <torch.hub.get_dir()>/checkpoints/


class LPIPSWeightsError(ReproError, RuntimeError):
    """LPIPS weights missing or unreadable (one line naming the config key to set)."""


@dataclass
class VAELossWeights:
    """Weights of the VAE's terms (REPA-E defaults); ``disc_start``: first step with the adversarial term."""

    recon: float = 1.0
    perceptual: float = 1.0
    kl: float = 1e-6
    disc: float = 0.1
    disc_start: int = 0


class LPIPS(nn.Module):
    """LPIPS (VGG16 variant): ``forward(a, b) -> (B, 1, 1, 1)``; frozen, eval. Key names as REPA-E's
    ``loss/lpips.py`` (``net.slice{1..5}.N.*``, ``lin{0..4}.model.1.weight``, ``scaling_layer.{shift,scale}``)."""

    def __init__(self):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        features = make_layers(cfgs["D"])  # VGG16's convolutional part (torchvision's indices)
        self.net = nn.Module()
        for k, (lo, hi) in enumerate(_SLICES, start=1):
            s = nn.Sequential()
            for i in range(lo, hi):
                s.add_module(str(i), features[i])
            setattr(self.net, f"slice{k}", s)
        self.scaling_layer = nn.Module()
        self.scaling_layer.register_buffer("shift", torch.tensor(_SHIFT).reshape(1, 3, 1, 1))
        self.scaling_layer.register_buffer("scale", torch.tensor(_SCALE).reshape(1, 3, 1, 1))
        for k, c in enumerate(_CHANNELS):
            setattr(self, f"lin{k}", nn.Module())
            getattr(self, f"lin{k}").model = nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False))
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # always eval (no dropout), as REPA-E's PerceptualLoss

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a, b: (B, 3, H, W) images as REPA-E passes them -> (B, 1, 1, 1) distances."""
        shift, scale = self.scaling_layer.shift, self.scaling_layer.scale
        ha, hb = ((a * 2 - 1) - shift) / scale, ((b * 2 - 1) - shift) / scale
        total = 0.0
        for k in range(len(_SLICES)):
            ha, hb = getattr(self.net, f"slice{k + 1}")(ha), getattr(self.net, f"slice{k + 1}")(hb)
            na = ha / (ha.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = hb / (hb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + getattr(self, f"lin{k}").model((na - nb) ** 2).mean((2, 3), keepdim=True)
        return total


def _vgg_from_torchvision(sd: dict) -> dict:
    """torchvision ``features.N.*`` keys -> LPIPS ``net.sliceK.N.*``."""
    out = {}
    for key, v in sd.items():
        if key.startswith("features."):
            n = int(key.split(".")[1])
            k = next(i for i, (lo, hi) in enumerate(_SLICES, start=1) if lo <= n < hi)
            out[f"net.slice{k}.{key[len('features.'):]}"] = v
    return out


def _read(path: str, key: str) -> dict:
    if not Path(path).is_file():
        raise LPIPSWeightsError(f"{key}={path}: no such file")
    try:
        return dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:  # noqa: BLE001 - one-line error
        raise LPIPSWeightsError(f"{key}={path}: not a torch state dict ({type(e).__name__})") from e


def load_lpips(lpips_weights: Optional[str], vgg_weights: Optional[str] = None) -> LPIPS:
    """LPIPS with real weights: the lin layers (and the VGG, if there) from ``lpips_weights``; the VGG16 from
    ``vgg_weights`` (torchvision file) or torch hub's cache. Missing -> :class:`LPIPSWeightsError`."""
    if not lpips_weights:
        raise LPIPSWeightsError("the perceptual loss needs LPIPS weights: set vae_loss.lpips_weights=/path/to/vgg.pth "
                                "(the LPIPS lin layers of taming-transformers or the lpips package), or "
                                "vae_loss.perceptual_weight=0 to train without it")
    sd = _read(lpips_weights, "vae_loss.lpips_weights")
    if not any(k.startswith("net.") for k in sd):
        hub = Path(torch.hub.get_dir()) / "checkpoints" / VGG_HUB_FILE
        path = vgg_weights or (str(hub) if hub.is_file() else None)
        if path is None:
            raise LPIPSWeightsError(f"LPIPS needs the ImageNet VGG16: set vae_loss.vgg_weights=/path/to/"
                                    f"{VGG_HUB_FILE} (torchvision's file; looked in {hub.parent})")
        sd.update(_vgg_from_torchvision(_read(path, "vae_loss.vgg_weights")))
    model = LPIPS()
    wanted = {k for k in model.state_dict() if not k.startswith("scaling_layer.")}
    missing = sorted(wanted - set(sd))
    if missing:
        raise LPIPSWeightsError(f"vae_loss.lpips_weights={lpips_weights}: missing LPIPS weights {missing[:3]}")
    model.load_state_dict({k: sd[k].float() for k in wanted}, strict=False)
    return model


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over (C, h, w) -> (B,); logvar clamped to [-30, 20]."""
    logvar = logvar.clamp(-30.0, 20.0)
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3))


def vae_loss_terms(x: torch.Tensor, recon: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor,
                   disc: nn.Module, lpips: Optional[nn.Module], w: VAELossWeights, step: int) -> dict:
    """The VAE's own loss (REPA-E's generator loss) and its weighted terms, float32 scalars.

    x, recon: (B, 3, H, W) in [-1, 1]; mean, logvar: (B, C, h, w) posterior. ``disc`` must have
    ``requires_grad`` off for this call (the adversarial term trains the VAE only).
    """
    x, recon = x.float(), recon.float()
    rec = F.l1_loss(x, recon) * w.recon
    perc = lpips(x, recon).mean() if lpips is not None and w.perceptual > 0 else torch.zeros((), device=x.device)
    kl = kl_divergence(mean.float(), logvar.float()).sum() / x.shape[0]
    gan = -disc(recon).float().mean() if step >= w.disc_start and w.disc > 0 else torch.zeros((), device=x.device)
    terms = {"recon": rec, "perceptual": w.perceptual * perc, "kl": w.kl * kl, "gan": w.disc * gan}
    terms["vae"] = sum(terms.values())
    return terms
