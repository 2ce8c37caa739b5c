"""REPA-E's end-to-end step (``vae.tune=true``): the REPA loss trains the VAE too, the diffusion loss does not.

One step on images x (global batch drawn as in :mod:`repa_probe.training.trainer`), REPA-E's ``train_repae.py``::

    (a) mean, logvar = VAE.encode(x);  z = mean + std · ε;  x̂ = VAE.decode(z)
    (b) VAE update, the diffusion model frozen (requires_grad off) and in eval mode (its BatchNorm uses, and
        keeps, its running statistics):  L1 + LPIPS + KL + adversarial (vae_loss.*)
        + repa.vae_coeff · REPA(model(noise(bn(z), t, n)) up to block repa.encoder_depth)  -> VAE only
    (c) discriminator update: hinge on D(x), D(x̂.detach())   (factor 0 before vae_loss.disc_start)
    (d) diffusion update on bn(z.detach()) (train mode: batch statistics, running statistics move; the
        diffusion loss never reaches the VAE), same t and noise as (b), dropped labels:
        denoising + repa.proj_coeff · REPA
    (e) EMA of the diffusion model, BatchNorm buffers included (the trainer's ``update_ema``)

The sin-cos ``pos_embed`` is trained here, as in REPA-E (its ``requires_grad(model, True)`` after the VAE step
turns it on and its optimiser holds every parameter). Three AdamW optimisers (model: ``optim.lr``; VAE:
``vae.lr``; discriminator: ``vae_loss.disc_lr``; betas, eps,
weight decay and the gradient clip from ``optim.*``). The labels are dropped for (d) only: in (b) REPA-E's
model is in eval mode, where it drops none. Autocast (bf16 on GPU) covers the VAE and the diffusion model; the
VAE's losses and the discriminator run in float32, as REPA-E's loss module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

from repa_probe.encoders.discriminator import PatchDiscriminator, hinge_d_loss
from repa_probe.encoders.vae_losses import LPIPS, VAELossWeights, load_lpips, vae_loss_terms
from repa_probe.training.accel import autocast_for
from repa_probe.training.builders import model_inputs
from repa_probe.training.config import Config

LOSS_NAMES = ("VAE loss", "discriminator loss", "diffusion loss")  # order of the losses e2e_step returns


class VAEForward(nn.Module):
    """``(x, eps) -> (mean, logvar, z, recon)`` of a diffusers ``AutoencoderKL`` (one module for DDP).

    x: (B, 3, H, W) in [-1, 1]; eps: (B, C, h, w); z = mean + exp(logvar / 2) · eps (logvar clamped to
    [-30, 20]); recon: (B, 3, H, W)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, eps: torch.Tensor):
        dist = self.vae.encode(x).latent_dist
        z = dist.mean + dist.std * eps.to(dist.mean.dtype)
        return dist.mean, dist.logvar, z, self.vae.decode(z).sample


@dataclass
class E2EParts:
    """The trained VAE (diffusers ``AutoencoderKL``), the discriminator, LPIPS (None when off), the loss
    weights, their optimisers, and what the step calls (``vae_net`` / ``disc_net``: DDP-wrapped when needed)."""

    vae: nn.Module
    disc: PatchDiscriminator
    lpips: Optional[LPIPS]
    weights: VAELossWeights
    opt_vae: torch.optim.Optimizer
    opt_disc: torch.optim.Optimizer
    vae_net: nn.Module
    disc_net: nn.Module

    def state_dict(self) -> dict:
        config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.vae.config.items()
                  if not k.startswith("_")}
        return {"vae": self.vae.state_dict(), "vae_config": config, "discriminator": self.disc.state_dict(),
                "opt_vae": self.opt_vae.state_dict(), "opt_disc": self.opt_disc.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.vae.load_state_dict(state["vae"])
        self.disc.load_state_dict(state["discriminator"])
        self.opt_vae.load_state_dict(state["opt_vae"])
        self.opt_disc.load_state_dict(state["opt_disc"])

    def prepare(self, dist, device: torch.device) -> None:
        """Wrap the VAE and the discriminator in DDP for a multi-process run (gradients averaged)."""
        if dist.enabled:
            ids = [device.index] if device.type == "cuda" else None
            self.vae_net = nn.parallel.DistributedDataParallel(self.vae_net, device_ids=ids)
            self.disc_net = nn.parallel.DistributedDataParallel(self.disc_net, device_ids=ids)


def _adamw(params, lr: float, cfg: Config) -> torch.optim.Optimizer:
    o = cfg.optim
    return torch.optim.AdamW(params, lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps, fused=True)


def build_e2e(cfg: Config, latent_vae, device: torch.device) -> E2EParts:
    """The trainable parts of ``vae.tune=true`` from the loaded VAE (its diffusers module is trained in place)."""
    lw = cfg.vae_loss
    lpips = load_lpips(lw.lpips_weights, lw.vgg_weights).to(device) if lw.perceptual_weight > 0 else None
    vae = latent_vae.vae.to(device).requires_grad_(True).train()
    disc = PatchDiscriminator(ndf=lw.disc_channels).to(device).train()
    weights = VAELossWeights(recon=lw.recon_weight, perceptual=lw.perceptual_weight, kl=lw.kl_weight,
                             disc=lw.disc_weight, disc_start=lw.disc_start)
    return E2EParts(vae, disc, lpips, weights, _adamw(vae.parameters(), cfg.vae.lr, cfg),
                    _adamw(disc.parameters(), lw.disc_lr, cfg), VAEForward(vae), disc)


@dataclass
class StepInputs:
    """One step's tensors: images x (B, 3, H, W) in [-1, 1], labels y (B,) and y_drop (B,) (dropped for the
    diffusion update), encoder tokens z_enc (B, T, D) or None, t (B,), noise and eps (B, C, h, w)."""

    x: torch.Tensor
    y: torch.Tensor
    y_drop: torch.Tensor
    z_enc: Optional[torch.Tensor]
    t: torch.Tensor
    noise: torch.Tensor
    eps: torch.Tensor


def e2e_step(s, draw: Callable) -> tuple[dict, torch.Tensor]:
    """Draw the next batch and its randomness (``draw`` = the trainer's ``objective_noise``), then
    :func:`e2e_update`. The posterior noise ε is drawn for the global batch from ``s.gen`` first."""
    cfg = s.cfg
    x, z_enc, y = model_inputs(s.batches.next(), None, s.enc_net, s.device, s.gen, s.dist, cfg,
                               s.model.grid_size, enc_autocast=autocast_for(cfg, s.device))
    f = 2 ** (len(s.e2e.vae.config.block_out_channels) - 1)
    b, w = x.shape[0], s.dist.world_size
    shape = (b * w, s.e2e.vae.config.latent_channels, x.shape[2] // f, x.shape[3] // f)
    eps = torch.randn(shape, generator=s.gen, device=s.device)[s.dist.rank::w]
    t, noise, y_drop = draw(s.objective, eps, y, s.gen, s.dist, cfg, s.batches.num_classes)
    return e2e_update(s, StepInputs(x, y, y_drop, z_enc, t, noise, eps))


def _clip(params, cfg: Config) -> torch.Tensor:
    return torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf"))


def align_tokens(model, objective, z: torch.Tensor, t, noise, y) -> list[torch.Tensor]:
    """REPA's projected tokens of ``model`` on the noised, BatchNorm-normalised latents z: (B, C, h, w),
    running only the blocks up to ``encoder_depth`` (REPA-E's ``align_only``) -> [(B, T, z_dim)]."""
    x_t = objective.add_noise(model.bn(z), t, noise)
    h = model.forward_features(x_t, objective.model_time(t), y, [model.encoder_depth - 1])[0]
    return model.project(h)


def _vae_update(s, inp: StepInputs, out) -> dict:
    """(b): the VAE's losses + vae_coeff · REPA through the frozen, eval-mode diffusion model; VAE step."""
    from repa_probe.objectives import repa_loss

    p, cfg, model = s.e2e, s.cfg, s.model
    mean, logvar, z, recon = out
    model.eval()
    for q in s.params:
        q.requires_grad_(False)
    p.disc.requires_grad_(False)
    try:
        terms = vae_loss_terms(inp.x, recon, mean, logvar, p.disc, p.lpips, p.weights, s.step)
        loss = terms["vae"]
        if inp.z_enc is not None:
            with torch.set_grad_enabled(cfg.repa.vae_coeff > 0), autocast_for(cfg, s.device):
                zs = align_tokens(model, s.objective, z, inp.t, inp.noise, inp.y)
            terms["vae_repa"], _ = repa_loss(zs, [inp.z_enc])
            loss = loss + cfg.repa.vae_coeff * terms["vae_repa"] if cfg.repa.vae_coeff > 0 else loss
        terms["vae"] = loss
        loss.backward()
    finally:
        for q in s.params:
            q.requires_grad_(True)
        p.disc.requires_grad_(True)
        model.train()
    terms["grad_norm_vae"] = _clip(list(p.vae.parameters()), cfg)
    p.opt_vae.step()
    p.opt_vae.zero_grad(set_to_none=True)
    return {k: v.detach() for k, v in terms.items()}


def _disc_update(s, x: torch.Tensor, recon: torch.Tensor) -> dict:
    """(c): one hinge step of the discriminator on real x and detached reconstructions (float32)."""
    p = s.e2e
    factor = 1.0 if s.step >= p.weights.disc_start else 0.0
    real, fake = p.disc_net(x.float()), p.disc_net(recon.detach().float())
    loss = factor * hinge_d_loss(real, fake)
    loss.backward()
    gnorm = _clip(list(p.disc.parameters()), s.cfg)
    p.opt_disc.step()
    p.opt_disc.zero_grad(set_to_none=True)
    return {"disc": loss.detach(), "logits_real": real.detach().mean(), "logits_fake": fake.detach().mean(),
            "grad_norm_disc": gnorm.detach()}


def _diffusion_update(s, inp: StepInputs, z: torch.Tensor) -> dict:
    """(d): denoising + proj_coeff · REPA on bn(z) (batch statistics; z is detached), model step."""
    from repa_probe.objectives import repa_loss

    cfg, obj = s.cfg, s.objective
    x0 = s.model.bn(z)
    x_t = obj.add_noise(x0, inp.t, inp.noise)
    with autocast_for(cfg, s.device):
        out, zs = s.net(x_t, obj.model_time(inp.t), inp.y_drop)
    terms = obj.loss(out.float(), x0, x_t, inp.noise, inp.t)
    loss = terms["loss"].mean()
    logs = {name: v.detach().mean() for name, v in terms.items()}
    if inp.z_enc is not None:
        proj, cos = repa_loss(zs, [inp.z_enc])
        loss = loss + cfg.repa.proj_coeff * proj
        logs.update(repa=proj.detach(), cos=cos.detach())
    loss.backward()
    logs["grad_norm"] = _clip(s.params, cfg).detach()
    s.opt.step()
    s.opt.zero_grad(set_to_none=True)
    logs["total"] = loss.detach()
    return logs


def e2e_update(s, inp: StepInputs) -> tuple[dict, torch.Tensor]:
    """Steps (a)-(d) on given tensors (no randomness drawn here). Returns the detached logs and the three
    losses ``(VAE, discriminator, diffusion)`` as a (3,) tensor, for the trainer's NaN check (LOSS_NAMES)."""
    p = s.e2e
    p.vae.train()
    s.opt.zero_grad(set_to_none=True)
    with autocast_for(s.cfg, s.device):
        out = p.vae_net(inp.x, inp.eps)
    logs = _vae_update(s, inp, out)
    logs.update(_disc_update(s, inp.x, out[3]))
    logs.update(_diffusion_update(s, inp, out[2].detach().float()))
    return logs, torch.stack([logs["vae"], logs["disc"], logs["total"]]).float()
