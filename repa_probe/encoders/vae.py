"""VAE latents the REPA way: posterior moments, per-step re-sampling, then a latent normalisation.

``load_vae(name)`` returns a frozen :class:`LatentVAE` (or ``None`` for pixel space). Images are uint8
``(B, 3, H, W)``; pixels are mapped with ``x / 127.5 - 1``. The normalisation ``z = raw * scale + bias`` is
SD-VAE's 0.18215 (a diffusers folder's ``scaling_factor`` / ``shift_factor``) or per channel (C,): REPA-E's
``-latents-stats.pt`` beside an LDM-layout VAE file, ``latents_stats.pt`` in an exported diffusers folder
(``python -m train.export_vae``), or a REPA-E model's BatchNorm statistics (:meth:`LatentVAE.with_batchnorm`).
32-channel f16 VAEs (VA-VAE, E2E-VA-VAE) work as 4-channel f8 ones. ``encode_moments`` returns the posterior
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
RANDOM_VAES = {  # random:NAME - tests and the tiny runs only
    "tiny": TINY_VAE_CONFIG,
    "tiny-f16d32": dict(TINY_VAE_CONFIG, latent_channels=32, block_out_channels=(32, 32, 32, 64, 64),
                        down_block_types=("DownEncoderBlock2D",) * 5, up_block_types=("UpDecoderBlock2D",) * 5),
}
STATS_FILE = "latents_stats.pt"  # in a diffusers folder: REPA-E's {latents_scale, latents_bias} or LightningDiT's {mean, std}, (1, C, 1, 1)


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


def _channels(v, like: torch.Tensor):
    """A float or a (C,) tensor as something that broadcasts over ``like: (B, C, h, w)``."""
    return v.to(like.device, like.dtype).reshape(1, -1, 1, 1) if torch.is_tensor(v) else v


class LatentVAE(nn.Module):
    """A frozen diffusers ``AutoencoderKL`` with REPA's latent conventions.

    Attributes: ``name``, ``scale`` and ``bias`` (floats, SD-VAE: 0.18215 and 0.0, or per-channel (C,) CPU
    tensors), ``latent_channels`` (C), ``downsample_factor`` (f). ``normalize(raw) = raw * scale + bias``;
    ``denormalize`` is its inverse unless ``decode_stats`` = (std, mean) says otherwise (a BatchNorm's eps is
    in the normalisation but not in REPA-E's de-normalisation). Always eval, ``requires_grad=False``, all
    methods run under no_grad.
    """

    def __init__(self, vae: nn.Module, name: str, scale=SD_VAE_SCALE, bias=0.0, decode_stats=None):
        super().__init__()
        self.vae = vae
        self.name = name
        self.scale = scale.float().reshape(-1) if torch.is_tensor(scale) else float(scale)
        self.bias = bias.float().reshape(-1) if torch.is_tensor(bias) else float(bias)
        self.decode_stats = decode_stats
        self.latent_channels = int(vae.config.latent_channels)
        self.downsample_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.requires_grad_(False)
        super().train(False)

    def with_batchnorm(self, running_mean: torch.Tensor, running_var: torch.Tensor, eps: float) -> "LatentVAE":
        """This VAE normalised as a REPA-E model's BatchNorm in eval mode: ``(raw - mean) / sqrt(var + eps)``,
        de-normalised with ``sqrt(var)`` (no eps, REPA-E's ``generate.py``). mean, var: (C,)."""
        mean, var = running_mean.detach().float().cpu(), running_var.detach().float().cpu()
        scale = (var + eps).rsqrt()
        return LatentVAE(self.vae, self.name, scale, -mean * scale, decode_stats=(var.sqrt(), mean))

    def latent_stats(self) -> dict:
        """REPA-E's ``latents_stats`` of this normalisation: ``latents_scale``, ``latents_bias`` (1, C, 1, 1)
        with ``z = (raw - latents_bias) * latents_scale`` (a BatchNorm's as REPA-E's ``save_vae_weights.py``)."""
        c = self.latent_channels
        if self.decode_stats is not None:
            std, mean = self.decode_stats
            scale, bias = 1.0 / std, mean
        else:
            scale = self.scale if torch.is_tensor(self.scale) else torch.full((c,), self.scale)
            bias = -(self.bias if torch.is_tensor(self.bias) else torch.full((c,), self.bias)) / scale
        return {"latents_scale": scale.reshape(1, c, 1, 1).clone(), "latents_bias": bias.reshape(1, c, 1, 1).clone()}

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """raw: (B, C, h, w) VAE latents -> what the diffusion model sees, ``raw * scale + bias``."""
        return raw * _channels(self.scale, raw) + _channels(self.bias, raw)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, C, h, w) normalised latents -> raw VAE latents."""
        if self.decode_stats is not None:
            std, mean = self.decode_stats
            return z * _channels(std, z) + _channels(mean, z)
        return (z - _channels(self.bias, z)) / _channels(self.scale, z)

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
        mean, std = moments.chunk(2, dim=1)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.normalize(mean + std * noise)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, C, h, w) scaled latents -> (B, 3, h*f, w*f) uint8 images.

        Like REPA's ``generate.py``: ``x = decode(denormalize(z))`` (SD-VAE: ``(z - bias) / scale``),
        ``clamp(255 * (x + 1) / 2, 0, 255)`` then truncation to uint8."""
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise VAEInputError(f"z must be (B, {self.latent_channels}, h, w), got {tuple(z.shape)}")
        if z.device != self.device:
            raise VAEInputError(f"z is on {z.device} but the VAE is on {self.device}")
        with torch.no_grad():
            x = self.vae.decode(self.denormalize(z).to(self.dtype)).sample
            return torch.clamp(255.0 * (x.float() + 1.0) / 2.0, 0, 255).to(torch.uint8)

    def extra_repr(self) -> str:
        per_channel = torch.is_tensor(self.scale)
        return (f"name={self.name}, scale={'per-channel' if per_channel else self.scale}, "
                f"bias={'per-channel' if per_channel else self.bias}, f={self.downsample_factor}")


def load_vae(name_or_path: str | os.PathLike | None, device: torch.device | str | None = None) -> LatentVAE | None:
    """``None`` / ``"none"`` -> None (pixel space); ``random:tiny`` (f8, 4 channels) or ``random:tiny-f16d32``
    (f16, 32 channels) -> small random AutoencoderKL (tests); ``stabilityai/sd-vae-ft-mse`` | ``-ema`` (or
    ``mse`` / ``ema``), any diffusers repo id or a local diffusers folder (with ``latents_stats.pt`` when
    exported by ``train.export_vae``) -> :class:`LatentVAE`; a ``.pt`` / ``.pth`` file holding an LDM-layout
    state dict (REPA-E's ``save_vae_weights.py``, VA-VAE) with REPA-E's ``-latents-stats.pt`` beside it
    (required). Moved to ``device`` when given. Offline and not cached -> :class:`VAEWeightsError`."""
    if name_or_path is None or str(name_or_path).lower() == "none":
        return None
    from diffusers import AutoencoderKL

    name = SD_VAE_ALIASES.get(str(name_or_path), str(name_or_path))
    path = os.path.expanduser(name)
    stats = None
    if name.startswith("random:"):
        if name[len("random:"):] not in RANDOM_VAES:
            raise VAEWeightsError(f"unknown random VAE {name!r}; valid: "
                                  f"{', '.join('vae.name=random:' + k for k in RANDOM_VAES)}")
        vae = AutoencoderKL(**RANDOM_VAES[name[len("random:"):]])
    elif os.path.isdir(path):
        try:
            vae = AutoencoderKL.from_pretrained(path, low_cpu_mem_usage=False)
        except Exception as e:  # noqa: BLE001 - one-line error
            raise VAEWeightsError(f"vae.name={name}: not a loadable diffusers AutoencoderKL folder "
                                  f"({type(e).__name__})") from e
        if os.path.isfile(os.path.join(path, STATS_FILE)):
            stats = _read_stats(Path(path) / STATS_FILE)
    elif os.path.isfile(path):
        vae, stats = _from_ldm_file(Path(path))
    elif name.count("/") == 1 and not os.path.exists(name):
        vae = _from_hub(AutoencoderKL, name)
    else:
        raise VAEWeightsError(f"vae.name={name}: neither 'none', 'random:...', a HF repo id, a local diffusers "
                              "folder nor an LDM-layout VAE file")
    out = _wrap(vae, name, stats)
    return out if device is None else out.to(device)


def _wrap(vae, name: str, stats: dict | None) -> LatentVAE:
    """LatentVAE with REPA-E's statistics (``z = (raw - latents_bias) * latents_scale``) or the folder's
    ``scaling_factor`` / ``shift_factor`` (SD-VAE: 0.18215, no shift)."""
    if stats is not None:
        scale, bias = stats["latents_scale"].reshape(-1), stats["latents_bias"].reshape(-1)
        return LatentVAE(vae, name, scale, -bias * scale)
    scale = float(getattr(vae.config, "scaling_factor", None) or SD_VAE_SCALE)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    return LatentVAE(vae, name, scale, -shift * scale)


def _read_stats(path: Path) -> dict:
    """A latent statistics file -> {latents_scale, latents_bias} float tensors: REPA-E's, or LightningDiT's
    ``latents_stats.pt`` ``{mean, std}`` (its model sees ``(raw - mean) / std``: scale 1 / std, bias mean)."""
    try:
        stats = torch.load(path, map_location="cpu", weights_only=True)
        if "latents_scale" not in stats and {"mean", "std"} <= set(stats):
            return {"latents_scale": 1.0 / stats["std"].float(), "latents_bias": stats["mean"].float()}
        return {k: stats[k].float() for k in ("latents_scale", "latents_bias")}
    except Exception as e:  # noqa: BLE001 - one-line error
        raise VAEWeightsError(f"{path}: not latent statistics (REPA-E's {{latents_scale, latents_bias}} or "
                              f"LightningDiT's {{mean, std}}) ({type(e).__name__})") from e


def _from_ldm_file(path: Path):
    """(diffusers AutoencoderKL, stats) from an LDM-layout state dict file and its ``-latents-stats.pt``."""
    from repa_probe.encoders.ldm_vae import LDMLayoutError, build_from_ldm, latents_stats_path

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - one-line error
        raise VAEWeightsError(f"vae.name={path}: not a torch state dict file ({type(e).__name__})") from e
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    try:
        vae = build_from_ldm(sd)
    except LDMLayoutError as e:
        raise VAEWeightsError(f"vae.name={path}: {e}") from e
    stats_file = latents_stats_path(path)
    if not stats_file.is_file():
        raise VAEWeightsError(f"vae.name={path}: its latent statistics {stats_file.name} are missing (REPA-E "
                              "writes them beside the VAE; without them the latents cannot be normalised)")
    return vae, _read_stats(stats_file)


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
