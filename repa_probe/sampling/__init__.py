"""Samplers of the three official codebases, reproduced exactly: ``sample(model, noise, labels, ...)``.

Flow models (ours, REPA, official SiT): ``"euler"`` / ``"heun"`` (REPA's ``euler_sampler``) and ``"sde"``
(REPA's ``euler_maruyama_sampler``), all in REPA time. DiT: ``"ddpm"`` (ancestral, learned variance) and
``"ddim"`` (eta = 0) over ``space_timesteps(1000, "N")``. Classifier-free guidance ``u + w (c - u)`` doubles
the batch only inside the guidance interval (REPA time, t = 1 noise; DiT steps map to ``step / 999``).
What each model receives follows its ``time_convention`` (:mod:`repa_probe.timesteps`, the one owner of time):
``repa`` gets t, ``sit`` gets 1 - t and returns the velocity of SiT time (so v = -u), ``ddpm`` the step.
REG models (``cls_token_dim > 0``) sample their class token jointly with the latents (:mod:`repa_probe.sampling.reg`).
"""
from __future__ import annotations

import dataclasses
from typing import Union

import torch

from repa_probe.sampling import ddpm, flow, reg
from repa_probe.sampling.guidance import DEFAULT_CFG_CHANNELS, Guidance, SamplingError, guided_output, make_guidance
from repa_probe.sampling.noise import NoiseSource, step_noise
from repa_probe.objectives.flow import sit_velocity_to_repa
from repa_probe.timesteps import CONVENTIONS, model_input, user_time

__all__ = ["sample", "Sampler", "METHODS", "SamplingError", "DEFAULT_CFG_CHANNELS", "NoiseSource", "methods_for"]

METHODS = {"flow": ("euler", "heun", "sde"), "ddpm": ("ddpm", "ddim")}


def methods_for(convention: str) -> tuple[str, ...]:
    """The sampling methods that apply to a model of time ``convention`` ("repa" | "sit" | "ddpm")."""
    return METHODS["ddpm"] if convention == "ddpm" else METHODS["flow"]


@dataclasses.dataclass(frozen=True)
class Sampler:
    """How :func:`sample` integrates (checked against the model when sampling).

    Fields:
        method: "euler", "heun", "sde" (flow families) or "ddpm", "ddim" (DiT).
        steps: ODE/SDE steps (heun: 2 * steps - 1 evaluations) or respaced DDPM steps.
        cfg_scale: guidance w (1 = conditional only); guidance_interval: (low, high) in REPA time.
        cfg_channels: "auto" (repa all, ddpm/sit the first 3, as DiT's and SiT's forward_with_cfg), "all" or k
            (the first k channels are guided).
        path: flow interpolant of the model ("linear" or "cosine"; only the SDE's score uses it).
        num_timesteps: T of a DiT model's diffusion (1000).
        cls_cfg_scale: REG models: guidance of the class token (None: ``cfg_scale``; <= 0: its conditional
            velocity), applied where the image is guided.
        timestep_shift: LightningDiT's grid shift s of "euler" / "heun" (0 = off; theirs: 0.3), see
            :func:`repa_probe.sampling.flow.shift_time`; not for REG models.
    """

    method: str
    steps: int
    cfg_scale: float = 1.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    cfg_channels: Union[str, int] = "auto"
    path: str = "linear"
    num_timesteps: int = 1000
    cls_cfg_scale: float | None = None
    timestep_shift: float = 0.0


def _check_inputs(model, noise: torch.Tensor, labels: torch.Tensor, sampler: Sampler) -> str:
    method, steps = sampler.method, sampler.steps
    convention = getattr(model, "time_convention", "repa")
    if convention not in CONVENTIONS:
        raise SamplingError(f"unknown time convention {convention!r} (one of {', '.join(CONVENTIONS)})")
    allowed = methods_for(convention)
    if method not in allowed:
        kind = "a DDPM (DiT)" if convention == "ddpm" else "a flow"
        raise SamplingError(f"method {method!r} does not apply to {kind} model ({convention} time): use one of "
                            f"{', '.join(allowed)} (--method)")
    lo = 2 if convention == "ddpm" else 1
    hi = sampler.num_timesteps if convention == "ddpm" else None
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < lo or (hi and steps > hi):
        raise SamplingError(f"steps must be an int in {lo}..{hi or 'inf'} for {method}, got {steps!r} (--steps)")
    c, s = model.in_channels, model.input_size
    if noise.ndim != 4 or tuple(noise.shape[1:]) != (c, s, s) or not noise.is_floating_point():
        raise SamplingError(f"noise must be float (B, {c}, {s}, {s}) for this model, got {tuple(noise.shape)}")
    if labels.shape != (noise.shape[0],) or labels.is_floating_point():
        raise SamplingError(f"labels must be an integer tensor of shape ({noise.shape[0]},), got "
                            f"{tuple(labels.shape)} {labels.dtype}")
    shift = sampler.timestep_shift
    if shift and (method not in ("euler", "heun") or not shift > 0 or getattr(model, "cls_token_dim", 0)):
        raise SamplingError(f"timestep shift must be > 0 (0 = off) and applies to euler / heun of non-REG models, "
                            f"got {shift} with {method} (--timestep-shift)")
    return convention


@torch.no_grad()
def sample(model, noise: torch.Tensor, labels: torch.Tensor, sampler: Sampler | None = None, *,
           generator: Union[torch.Generator, NoiseSource, None] = None, cls_noise: torch.Tensor | None = None,
           **options) -> torch.Tensor:
    """Draw samples from ``model`` (anything ``repa_probe.checkpoint.load_model`` returns).

    Args:
        model: network ``model(x, t, y) -> (out, ...)`` with ``time_convention`` ("repa", "sit", "ddpm"), ``num_classes``,
            ``in_channels``, ``input_size``; called in ``noise.dtype`` (wrap in autocast for bf16).
        noise: (B, C, H, W) initial Gaussian noise. labels: (B,) int64 classes.
        sampler: how to integrate (:class:`Sampler`), or its fields as keywords: ``sample(model, z, y,
            method="sde", steps=250, cfg_scale=1.8, guidance_interval=(0, 0.7))``.
        generator: per-step noise of "sde"/"ddpm": a torch.Generator (drawn as the official code does), a
            ``NoiseSource`` (per-sample seeding), or None (global RNG).
        cls_noise: REG models: initial class-token noise ``(B, cls_token_dim)`` (None: drawn from ``generator``
            after nothing else, as REG's ``generate.py`` draws it after the latents and labels).
    Returns:
        (B, C, H, W) final latents in ``noise.dtype``, in the model's data space.
    """
    if sampler is None:
        sampler = Sampler(**options)
    elif options:
        raise TypeError(f"sample() takes a Sampler or its fields as keywords, not both (got {sorted(options)})")
    convention = _check_inputs(model, noise, labels, sampler)
    guidance = make_guidance(model, sampler.cfg_scale, sampler.guidance_interval, sampler.cfg_channels,
                             noise.shape[1])
    dtype, x = noise.dtype, noise.to(torch.float64)
    if getattr(model, "cls_token_dim", 0):
        cls = reg.initial_class_token(model, x.shape[0], cls_noise, generator, x.device)
        out = reg.sample_joint(model, (x, cls), labels, sampler, guidance, generator, dtype)
    elif convention == "ddpm":
        out = _sample_ddpm(model, x, labels, sampler, guidance, step_noise(generator, torch.float32), dtype)
    else:
        out = _sample_flow(model, x, labels, sampler, guidance, step_noise(generator, torch.float64), dtype)
    return out.to(dtype)


def _sample_flow(model, x, labels, sampler: Sampler, guidance: Guidance, noise: NoiseSource, dtype):
    convention = getattr(model, "time_convention", "repa")

    def velocity(state, t: float, active: bool) -> torch.Tensor:
        b = state.shape[0]
        t_in = model_input(torch.full((b,), t, dtype=torch.float64, device=state.device), convention).to(dtype)
        out = guided_output(model, state.to(dtype), t_in, labels, guidance, active)
        return sit_velocity_to_repa(out) if convention == "sit" else out

    if sampler.method == "sde":
        return flow.euler_maruyama(velocity, x, sampler.steps, guidance.active, noise, sampler.path)
    return flow.euler(velocity, x, sampler.steps, sampler.method == "heun", guidance.active, sampler.timestep_shift)


def _sample_ddpm(model, x, labels, sampler: Sampler, guidance: Guidance, noise: NoiseSource, dtype):
    diffusion = ddpm.respaced(sampler.num_timesteps, sampler.steps)
    kept = diffusion.timestep_map.tolist()

    def output(state, k: int) -> torch.Tensor:
        t_in = torch.full((state.shape[0],), kept[k], dtype=torch.int64, device=state.device)
        active = guidance.active(float(user_time(torch.tensor([kept[k]]), "ddpm", sampler.num_timesteps)))
        return guided_output(model, state.to(dtype), t_in, labels, guidance, active)

    return ddpm.diffusion_loop(output, x, diffusion, sampler.method, noise)
