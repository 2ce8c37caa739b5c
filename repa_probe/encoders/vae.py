"""SD-VAE latents the REPA way: posterior moments, per-step re-sampling, scale 0.18215.

``load_vae(name)`` returns a frozen :class:`LatentVAE` (or ``None`` for pixel space). Images are uint8
``(B, 3, H, W)``; pixels are mapped with ``x / 127.5 - 1``. ``encode_moments`` returns the posterior
``mean || std`` ``(B, 2C, H/f, W/f)`` in fp32 (f = 8 for SD-VAE and ``random:tiny``), which
``extract_latents`` stores in REPA's preprocessed layout::

    out_dir/vae-sd/{idx[:5]}/img-mean-std-{idx:08d}.npy   float32 (2C, h, w)
    out_dir/vae-sd/dataset.json                           {"labels": [["00000/img-mean-std-00000000.npy", y], ...]}
    out_dir/images/{idx[:5]}/img{idx:08d}.png              optional, uint8 RGB
    out_dir/images/dataset.json                           {"labels": [["00000/img00000000.png", y], ...]}

where ``idx[:5]`` is the first five digits of the zero-padded 8-digit index. REPA's ``CustomDataset``
reads this layout directly.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from repa_probe.encoders.weights import _hub_offline
from repa_probe.errors import ReproError

SD_VAE_SCALE = 0.18215
SD_VAE_ALIASES = {"mse": "stabilityai/sd-vae-ft-mse", "ema": "stabilityai/sd-vae-ft-ema"}
TINY_VAE_CONFIG = dict(  # random:tiny - 8x downsampling like SD-VAE, ~1M parameters, tests only
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=32,
    block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=32)


#: the VAE a file that stores no training config is decoded with, by the latent channels of its model (3 =
#: pixels, no VAE). Official DiT / SiT / REPA files: SD-VAE (ft-EMA, as their sampling scripts). A latent
#: family whose files store no config (e.g. 32-channel REPA-E / VA-VAE latents) adds its row here.
DEFAULT_VAE_BY_CHANNELS = {3: "none", 4: "stabilityai/sd-vae-ft-ema"}


class VAEWeightsError(ReproError, RuntimeError):
    """The requested VAE cannot be loaded (one-line message naming the ``vae.name`` config key)."""


class VAEInputError(ReproError, ValueError):
    """Bad images / moments passed to a :class:`LatentVAE` (one-line message)."""


def sample_posterior(moments: torch.Tensor, scale: float = SD_VAE_SCALE, bias: float = 0.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """REPA's ``sample_posterior``: moments (B, 2C, h, w) = mean || std -> z (B, C, h, w),
    ``z = (mean + std * N(0, 1)) * scale + bias``. Noise is drawn on ``moments.device`` with ``generator``."""
    if moments.ndim != 4 or moments.shape[1] % 2:
        raise VAEInputError(f"moments must be (B, 2C, h, w), got {tuple(moments.shape)}")
    mean, std = moments.chunk(2, dim=1)
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * noise) * scale + bias


class LatentVAE(nn.Module):
    """A frozen diffusers ``AutoencoderKL`` with REPA's latent conventions.

    Attributes: ``name``, ``scale`` (0.18215), ``bias`` (0.0), ``latent_channels`` (C),
    ``downsample_factor`` (f). Always eval, ``requires_grad=False``, all methods run under no_grad.
    """

    def __init__(self, vae: nn.Module, name: str, scale: float = SD_VAE_SCALE, bias: float = 0.0):
        super().__init__()
        self.vae = vae
        self.name = name
        self.scale = float(scale)
        self.bias = float(bias)
        self.latent_channels = int(vae.config.latent_channels)
        self.downsample_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "LatentVAE":
        """The VAE stays in eval mode whatever the caller asks."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) uint8 on the VAE's device -> (B, 2C, H/f, W/f) float32 posterior mean || std."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise VAEInputError(f"images must be uint8 (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        f = self.downsample_factor
        if images.shape[-1] % f or images.shape[-2] % f:
            raise VAEInputError(f"image size {tuple(images.shape[-2:])} is not divisible by {f}")
        if images.device != self.device:
            raise VAEInputError(f"images are on {images.device} but the VAE is on {self.device}")
        with torch.no_grad():
            x = (images.to(torch.float32) / 127.5 - 1.0).to(self.dtype)
            dist = self.vae.encode(x).latent_dist
            return torch.cat([dist.mean, dist.std], dim=1).to(torch.float32)

    def sample(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """moments: (B, 2C, h, w) -> z: (B, C, h, w) = (mean + std * eps) * scale + bias."""
        if moments.shape[1] != 2 * self.latent_channels:
            raise VAEInputError(f"moments have {moments.shape[1]} channels, expected {2 * self.latent_channels}")
        return sample_posterior(moments, self.scale, self.bias, generator)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, C, h, w) scaled latents -> (B, 3, h*f, w*f) uint8 images.

        Like REPA's ``generate.py``: ``x = decode((z - bias) / scale)``, ``clamp(255 * (x + 1) / 2, 0, 255)``
        then truncation to uint8."""
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise VAEInputError(f"z must be (B, {self.latent_channels}, h, w), got {tuple(z.shape)}")
        if z.device != self.device:
            raise VAEInputError(f"z is on {z.device} but the VAE is on {self.device}")
        with torch.no_grad():
            x = self.vae.decode(((z - self.bias) / self.scale).to(self.dtype)).sample
            return torch.clamp(255.0 * (x.float() + 1.0) / 2.0, 0, 255).to(torch.uint8)

    def extra_repr(self) -> str:
        return f"name={self.name}, scale={self.scale}, bias={self.bias}, f={self.downsample_factor}"


def load_vae(name_or_path: str | os.PathLike | None, device: torch.device | str | None = None) -> LatentVAE | None:
    """``None`` / ``"none"`` -> None (pixel space); ``random:tiny`` -> small random AutoencoderKL (tests);
    ``stabilityai/sd-vae-ft-mse`` | ``-ema`` (or ``mse`` / ``ema``), any diffusers repo id or a local
    diffusers folder -> :class:`LatentVAE`, moved to ``device`` when given. Offline and not cached ->
    :class:`VAEWeightsError`."""
    if name_or_path is None or str(name_or_path).lower() == "none":
        return None
    from diffusers import AutoencoderKL

    name = SD_VAE_ALIASES.get(str(name_or_path), str(name_or_path))
    if name == "random:tiny":
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
    elif name.startswith("random:"):
        raise VAEWeightsError(f"unknown random VAE {name!r}; only vae.name=random:tiny exists")
    elif os.path.isdir(os.path.expanduser(name)):
        try:
            vae = AutoencoderKL.from_pretrained(os.path.expanduser(name), low_cpu_mem_usage=False)
        except Exception as e:  # noqa: BLE001 - one-line error
            raise VAEWeightsError(f"vae.name={name}: not a loadable diffusers AutoencoderKL folder "
                                  f"({type(e).__name__})") from e
    elif name.count("/") == 1 and not os.path.exists(name):
        vae = _from_hub(AutoencoderKL, name)
    else:
        raise VAEWeightsError(f"vae.name={name}: neither 'none', 'random:tiny', a HF repo id nor a local folder")
    out = LatentVAE(vae, name)
    return out if device is None else out.to(device)


def _from_hub(cls, repo: str):
    """Cached copy first; download only when the hub is reachable."""
    try:
        with warnings.catch_warnings():  # diffusers passes a deprecated hub argument; not our concern
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            return cls.from_pretrained(repo, local_files_only=True, low_cpu_mem_usage=False)
    except Exception:  # noqa: BLE001 - not cached (or broken cache): maybe download below
        pass
    if _hub_offline():
        raise VAEWeightsError(
            f"VAE {repo} is not in the local HF cache and the hub is offline; set vae.name=/path/to/"
            f"{repo.split('/')[-1]} (a diffusers folder with config.json) or vae.name=none for pixel space")
    try:
        return cls.from_pretrained(repo, low_cpu_mem_usage=False)
    except Exception as e:  # noqa: BLE001
        raise VAEWeightsError(f"vae.name={repo}: download failed ({type(e).__name__})") from e


def _png_name(idx: int) -> str:
    s = f"{idx:08d}"
    return f"{s[:5]}/img{s}.png"


def _npy_name(idx: int) -> str:
    s = f"{idx:08d}"
    return f"{s[:5]}/img-mean-std-{s}.npy"


def extract_latents(dataset, vae: LatentVAE, out_dir: str | os.PathLike, batch_size: int = 32,
                    flip: bool = False, save_images: bool = True, num_workers: int = 0,
                    overwrite: bool = False, progress: bool = True) -> Path:
    """Encode every item of ``dataset`` (dicts with ``image`` uint8 (3, H, W) and ``label``) with ``vae``
    and write REPA's layout under ``out_dir`` (see the module docstring). Returns ``out_dir``.

    flip=True also stores horizontally flipped copies as extra items: item ``N + i`` (N = len(dataset))
    is item ``i`` flipped along W, encoded from the flipped image (same label, same file naming), so REPA's
    loader sees a dataset of 2N items. ``dataset.json`` then carries ``"flip": {"num_original": N}``.
    The ``dataset.json`` files are written last: a directory without them is an unfinished run.
    """
    from PIL import Image
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    out = Path(out_dir)
    lat_dir, img_dir = out / "vae-sd", out / "images"
    if (lat_dir / "dataset.json").exists() and not overwrite:
        raise VAEInputError(f"{lat_dir / 'dataset.json'} exists; pass overwrite=True (--overwrite) to re-extract")
    n = len(dataset)
    total = 2 * n if flip else n
    if total > 10 ** 8:
        raise VAEInputError(f"{total} items do not fit the 8-digit REPA file naming (at most 10^8)")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    lat_labels: list = [None] * total
    img_labels: list = [None] * total
    start = 0
    with tqdm(total=n, desc="extract latents", disable=not progress) as bar:
        for batch in loader:
            images, labels = batch["image"], batch["label"]
            b = images.shape[0]
            idx = torch.arange(start, start + b)
            if flip:
                images = torch.cat([images, images.flip(-1)])
                labels = torch.cat([torch.as_tensor(labels), torch.as_tensor(labels)])
                idx = torch.cat([idx, idx + n])
            moments = vae.encode_moments(images.to(vae.device)).cpu().numpy()
            pixels = images.permute(0, 2, 3, 1).numpy() if save_images else None
            for j, i in enumerate(idx.tolist()):
                y = int(labels[j])
                dst = lat_dir / _npy_name(i)
                dst.parent.mkdir(parents=True, exist_ok=True)
                np.save(dst, moments[j])
                lat_labels[i] = [_npy_name(i), y]
                if pixels is not None:
                    png = img_dir / _png_name(i)
                    png.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(np.ascontiguousarray(pixels[j])).save(png)
                    img_labels[i] = [_png_name(i), y]
            start += b
            bar.update(b)
    extra = {"flip": {"num_original": n}} if flip else {}
    if save_images:
        (img_dir / "dataset.json").write_text(json.dumps({"labels": img_labels, **extra}))
    (lat_dir / "dataset.json").write_text(json.dumps({"labels": lat_labels, **extra}))
    return out


def default_vae(latent_channels: int) -> str:
    """The VAE name for a model taking ``latent_channels``-channel inputs that stores no training config
    (:data:`DEFAULT_VAE_BY_CHANNELS`); unknown channel counts are a :class:`VAEWeightsError` asking for --vae."""
    if latent_channels not in DEFAULT_VAE_BY_CHANNELS:
        raise VAEWeightsError(f"the model takes {latent_channels}-channel latents and stores no VAE: pass --vae NAME "
                              f"(defaults exist for {', '.join(map(str, DEFAULT_VAE_BY_CHANNELS))} channels)")
    return DEFAULT_VAE_BY_CHANNELS[latent_channels]
