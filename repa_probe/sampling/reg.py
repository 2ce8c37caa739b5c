"""REG's joint sampling (Martinser/REG ``samplers.py``): the image latents and the class token are denoised together.

The state is the pair (latents ``(B, C, H, W)``, class token ``(B, D)``), packed here into one float64 ``(B,
C*H*W + D)`` tensor so that REPA's Euler / Heun / Euler–Maruyama loops (:mod:`repa_probe.sampling.flow`) run on
it unchanged: every operation of those loops is elementwise given t. One network call gives both velocities.
Guidance (inside the interval, when the image scale w != 1): the image as REPA guides it, the class token with
its own scale ``cls_cfg_scale`` (REG's ``--cls-cfg-scale``, default w), or its conditional velocity when that
scale is <= 0. REG guides the SDE drift rather than the velocity; the drift is affine in the velocity with the
same state for both halves, so the two agree (to float64 rounding). Per-step noise: a ``torch.Generator`` draws
the latents' noise, then the class token's (REG's order); a ``NoiseSource`` is called once on the packed state.
REG's ``generate.py`` runs the SDE only (its ODE path exits); Euler and Heun here are the same loops on the pair.
"""
from __future__ import annotations

from typing import Callable

import torch

from repa_probe.sampling import flow
from repa_probe.sampling.guidance import Guidance, SamplingError, guide
from repa_probe.sampling.noise import step_noise
from repa_probe.timesteps import model_input


def initial_class_token(model, batch: int, cls_noise, generator, device) -> torch.Tensor:
    """``cls_noise`` checked, or ``(B, cls_token_dim)`` N(0, I) float32 drawn from ``generator`` (REG draws it after
    the latents); a per-sample ``NoiseSource`` cannot draw it: pass ``cls_noise`` then."""
    d = model.cls_token_dim
    if cls_noise is None:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise SamplingError("a REG model sampled with per-sample noise needs its initial class-token noise: "
                                "pass cls_noise (B, cls_token_dim)")
        return torch.randn((batch, d), generator=generator, device=device)
    if cls_noise.shape != (batch, d) or not cls_noise.is_floating_point():
        raise SamplingError(f"cls_noise must be float ({batch}, {d}) for this REG model, got {tuple(cls_noise.shape)}")
    return cls_noise


def _joint_noise(generator, base: Callable, image_shape, n_image: int) -> Callable:
    def noise(step: int, packed: torch.Tensor) -> torch.Tensor:
        if generator is not None and not isinstance(generator, torch.Generator):
            return base(step, packed)
        image = base(step, packed.new_empty(image_shape))
        return torch.cat([image.flatten(1), base(step, packed[:, n_image:])], dim=1)
    return noise


def sample_joint(model, start: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor, sampler,
                 guidance: Guidance, generator, dtype: torch.dtype) -> torch.Tensor:
    """Sample a REG model (REPA time) from ``start = (x: (B, C, H, W), cls: (B, D))`` float64 with ``sampler``
    (a :class:`~repa_probe.sampling.Sampler`) and the per-step noise of ``generator``; returns the float64
    latents ``(B, C, H, W)`` (the class token is REG's means to an end: its ``generate.py`` keeps the images only)."""
    x, cls = start
    method, steps = sampler.method, sampler.steps
    cls_scale = sampler.cfg_scale if sampler.cls_cfg_scale is None else float(sampler.cls_cfg_scale)
    noise = step_noise(generator, torch.float64)
    if model.time_convention != "repa":
        raise SamplingError(f"REG models run in REPA time, got time convention {model.time_convention!r}")
    shape, n = x.shape, x[0].numel()

    def velocity(state: torch.Tensor, t: float, active: bool) -> torch.Tensor:
        b = state.shape[0]
        image, token = state[:, :n].reshape(shape).to(dtype), state[:, n:].to(dtype)
        t_in = model_input(torch.full((b,), t, dtype=torch.float64, device=state.device), "repa").to(dtype)
        if not active:
            out, _, cls_out = model(image, t_in, labels, cls_token=token)
        else:
            null = torch.full_like(labels, guidance.null)
            out, _, cls_out = model(torch.cat([image, image]), torch.cat([t_in, t_in]), torch.cat([labels, null]),
                                    cls_token=torch.cat([token, token]))
            out = guide(*out.double().chunk(2), guidance.scale, guidance.channels)
            cond, uncond = cls_out.double().chunk(2)
            cls_out = guide(cond, uncond, cls_scale) if cls_scale > 0 else cond
        return torch.cat([out.double().flatten(1), cls_out.double()], dim=1)

    state = torch.cat([x.flatten(1), cls.to(torch.float64)], dim=1)
    if method == "sde":
        state = flow.euler_maruyama(velocity, state, steps, guidance.active,
                                    _joint_noise(generator, noise, shape, n), sampler.path)
    else:
        state = flow.euler(velocity, state, steps, method == "heun", guidance.active)
    return state[:, :n].reshape(shape)
