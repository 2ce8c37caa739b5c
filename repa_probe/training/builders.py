"""Build library objects from a :class:`~repa_probe.training.config.Config` (shared by training and analysis)."""
from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Tuple

import torch

from repa_probe.data import LoaderOptions, ResumableSampler, build_dataset as _build, infinite_loader
from repa_probe.encoders.target import load_encoder
from repa_probe.trained_vae import load_any_vae
from repa_probe.models import create_model
from repa_probe.models.lightningdit import OPTION_NAMES as LIGHTNING_OPTIONS
from repa_probe.objectives import FlowMatching, GaussianDiffusion, match_token_grid, spatial_normalize
from repa_probe.training.config import Config, ConfigError, uses_encoder
from repa_probe.training.distributed import DistInfo

log = logging.getLogger("repa_probe")


def dataset_from_config(cfg: Config, split: str = "train"):
    """``split`` of the dataset ``cfg.data`` names (``data.root`` required for file datasets), unaugmented."""
    d = cfg.data
    if d.root is None and d.name not in ("shapes", "digits"):
        raise ConfigError(f"data.name={d.name} reads files: set data.root=/path/to/dataset")
    return _build(d.name, root=d.root, split=split, resolution=d.resolution, num_samples=d.num_samples,
                  seed=cfg.run.seed)  # no augmentation here: data.flip is applied by the training loader


def build_objective(cfg: Config):
    o = cfg.objective
    if o.kind == "flow":
        return FlowMatching(path=o.path, prediction=o.prediction, weighting=o.weighting, cosine_weight=o.cosine_weight)
    return GaussianDiffusion(num_timesteps=o.num_timesteps, learn_sigma=o.learn_sigma)


def build_encoder(cfg: Config, device: torch.device, required: bool = False):
    """The frozen target encoder of ``cfg`` (REPA, REG, HASTE; None for the vanilla baseline unless ``required``).

    Random weights (``encoder.pretrained=false``) are drawn from a generator seeded with ``run.seed`` alone,
    without touching the global RNG, so the analysis of a run rebuilds exactly the encoder it trained against.
    """
    if not uses_encoder(cfg) and not required:
        return None
    e = cfg.encoder
    kw = {"input_size": e.input_size} if e.input_size is not None else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        enc = load_encoder(e.name, weights=e.weights, pretrained=e.pretrained, resolution=cfg.data.resolution,
                           source=e.source, **kw)
    return enc.to(device)


def encoder_kind(cfg: Config) -> str:
    """What training reads from the target encoder: ``"cls+patch"`` for REG, else ``"patch"``."""
    return "cls+patch" if cfg.reg.cls_coeff > 0 else "patch"


def latent_shape(cfg: Config, vae) -> Tuple[int, int]:
    """(channels, side) of what the diffusion model sees: the VAE's latents (its ``latent_channels`` and
    ``downsample_factor``, e.g. 4 x f8 for SD-VAE, 32 x f16 for VA-VAE) or pixels (3, resolution)."""
    if vae is None:
        return 3, cfg.data.resolution
    f = vae.downsample_factor
    if cfg.data.resolution % f:
        raise ConfigError(f"data.resolution={cfg.data.resolution} must be a multiple of {f} for vae.name={vae.name} "
                          f"(it downsamples by {f})")
    return vae.latent_channels, cfg.data.resolution // f


def build_model(cfg: Config, batches: "Batches", enc):
    """The diffusion transformer for this config (REPA projector when ``repa.proj_coeff > 0``, REG's class token
    of the encoder's width when ``reg.cls_coeff > 0``)."""
    m, r = cfg.model, cfg.repa
    channels, side = latent_shape(cfg, batches.vae)
    overrides = {k: getattr(m, k) for k in ("depth", "hidden_size", "num_heads", "patch_size", *LIGHTNING_OPTIONS)
                 if getattr(m, k) is not None}
    ddpm = cfg.objective.kind == "ddpm"
    model = create_model(m.name, input_size=side, in_channels=channels, num_classes=batches.num_classes,
                         class_dropout_prob=m.class_dropout_prob, qk_norm=m.qk_norm,
                         learn_sigma=ddpm and cfg.objective.learn_sigma, time_convention="ddpm" if ddpm else "repa",
                         encoder_depth=r.encoder_depth, projector_dim=r.projector_dim, projector_type=r.projector,
                         projector_kernel=r.projector_kernel,
                         z_dims=(enc.embed_dim,) if enc is not None and r.proj_coeff > 0 else (),
                         cls_token_dim=enc.embed_dim if enc is not None and cfg.reg.cls_coeff > 0 else 0, **overrides,
                         **_latent_norm(cfg))
    if model.bn is not None:  # REPA-E: the BatchNorm starts from the VAE's latent statistics
        stats = batches.vae.latent_stats()
        model.bn.init_from_stats(stats["latents_bias"], 1.0 / stats["latents_scale"])
    if enc is not None:
        eg, mg = enc.grid_size, model.grid_size
        if eg != mg:
            log.info("encoder token grid %dx%d is resized to the model grid %dx%d (bilinear)", eg, eg, mg, mg)
    return model


def _latent_norm(cfg: Config) -> dict:
    """Model keywords of ``vae.latent_norm``: REPA-E's BatchNorm on the latents, or nothing."""
    return {"bn_momentum": cfg.vae.bn_momentum} if cfg.vae.latent_norm == "batchnorm" else {}


class Batches:
    """Dataset + VAE + resumable sharded sampler, yielding local batches forever.

    The sampler position counts the batches handed out (not those prefetched by workers); a checkpoint is
    written after the step that used the batch, so a resume starts with the first batch that did not train.
    ``data.flip``: each sample is flipped or not by a hash of (run.seed, epoch, index), in whichever worker
    loads it, so a resumed run flips exactly as the uninterrupted one (``data.infinite_loader``).
    ``pin_memory``: page-locked batches (on CUDA), copied with ``non_blocking=True`` by ``model_inputs``.
    """

    def __init__(self, cfg: Config, dist: DistInfo, split: str = "train", pin_memory: bool = False):
        self.dataset = dataset_from_config(cfg, split)
        self.vae = load_any_vae(cfg.vae.name)  # also a REPA-E run's tuned VAE (its latent statistics)
        self.num_classes = cfg.data.num_classes or self.dataset.num_classes
        self.local_batch = cfg.train.batch_size // dist.world_size
        if len(self.dataset) < cfg.train.batch_size:
            raise ConfigError(f"dataset has {len(self.dataset)} samples, fewer than train.batch_size="
                              f"{cfg.train.batch_size}")
        self.sampler = ResumableSampler(len(self.dataset), batch_size=self.local_batch, shuffle=True,
                                        seed=cfg.run.seed, rank=dist.rank, world_size=dist.world_size,
                                        drop_last=True)
        self.num_workers, self.flip, self.pin_memory = cfg.data.num_workers, cfg.data.flip, pin_memory
        self._it = None

    def next(self) -> dict:
        """The next local batch; the sampler position counts it as consumed (see data.sampler)."""
        if self._it is None:
            self._it = infinite_loader(self.dataset, self.sampler, self.local_batch,
                                       LoaderOptions(self.num_workers, self.pin_memory, flip=self.flip))
        return next(self._it)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self._it = None


def model_inputs(batch: dict, vae, enc, device: torch.device, gen: torch.Generator, dist: DistInfo,
                 cfg: Config, grid: int, enc_autocast=None):
    """Turn a data batch into (x0, encoder tokens or None, labels) on ``device``.

    x0: (b, C, H, W) — VAE latents sampled from the posterior (stored moments or encoded on the fly) and
    normalised by the VAE's scale / statistics (raw with ``vae.latent_norm=batchnorm``: the model's BatchNorm
    normalises them in the step), or pixels scaled to [-1, 1] when there is no VAE. The posterior noise is drawn
    for the global batch.
    ``enc_autocast``: context for the frozen encoder (the training autocast on GPU, as in REPA). With
    ``repa.spatial_norm_gamma`` set, the tokens (on the model's grid) are spatially normalised (iREPA), float32.
    REG (``reg.cls_coeff > 0``): the encoder's class token is put in front, ``(b, 1 + T, Dz)`` (REG's REPA targets).
    """
    images = batch["image"].to(device, non_blocking=True)
    y = batch["label"].to(device, non_blocking=True)
    if vae is None:
        x0 = images.float() / 127.5 - 1.0
    else:
        moments = batch["moments"].to(device, non_blocking=True) if "moments" in batch else vae.encode_moments(images)
        W = dist.world_size
        mean, std = moments.float().chunk(2, dim=1)
        eps = torch.randn((mean.shape[0] * W, *mean.shape[1:]), generator=gen, device=device)[dist.rank::W]
        x0 = mean + std * eps
        x0 = x0 if cfg.vae.latent_norm == "batchnorm" else vae.normalize(x0)
    z = None
    if enc is not None:
        with torch.no_grad(), (enc_autocast or nullcontext()):
            tokens = enc(images, encoder_kind(cfg))
            cls, patch = (tokens[:, :1], tokens[:, 1:]) if cfg.reg.cls_coeff > 0 else (None, tokens)
            z = match_token_grid(patch, grid)
            if cfg.repa.spatial_norm_gamma is not None:
                z = spatial_normalize(z, cfg.repa.spatial_norm_gamma)
            if cls is not None:
                z = torch.cat([cls.to(z.dtype), z], dim=1)
    return x0, z, y
