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

from typing import Callable, Union

import torch

from repa_probe.sampling import ddpm, flow, reg
from repa_probe.sampling.guidance import DEFAULT_CFG_CHANNELS, Guidance, SamplingError, guided_output, make_guidance
from repa_probe.objectives.flow import sit_velocity_to_repa
from repa_probe.timesteps import CONVENTIONS, model_input, user_time

__all__ = ["sample", "METHODS", "SamplingError", "DEFAULT_CFG_CHANNELS", "NoiseSource", "methods_for"]

METHODS = {"flow": ("euler", "heun", "sde"), "ddpm": ("ddpm", "ddim")}
#: per-step noise: ``noise(step, like) -> tensor shaped like ``like`` (B, C, H, W)`` (see analysis.generate)
NoiseSource = Callable[[int, torch.Tensor], torch.Tensor]


def methods_for(convention: str) -> tuple[str, ...]:
    """The sampling methods that apply to a model of time ``convention`` ("repa" | "sit" | "ddpm")."""
    return METHODS["ddpm"] if convention == "ddpm" else METHODS["flow"]


def _noise_fn(generator, draw_dtype: torch.dtype) -> NoiseSource:
    """Per-step N(0, I) draws: from a ``torch.Generator`` (or the global RNG) as the official code draws them
    (``draw_dtype``: float64 for REPA's SDE, float32 for DiT), or from a user ``NoiseSource``."""
    if generator is None or isinstance(generator, torch.Generator):
        return lambda step, like: torch.randn(like.shape, generator=generator, dtype=draw_dtype,
                                              device=like.device).to(like.dtype)
    return lambda step, like: generator(step, like).to(like.dtype)


def _check_inputs(model, noise, labels, method, steps, num_timesteps):
    convention = getattr(model, "time_convention", "repa")
    if convention not in CONVENTIONS:
        raise SamplingError(f"unknown time convention {convention!r} (one of {', '.join(CONVENTIONS)})")
    allowed = methods_for(convention)
    if method not in allowed:
        kind = "a DDPM (DiT)" if convention == "ddpm" else "a flow"
        raise SamplingError(f"method {method!r} does not apply to {kind} model ({convention} time): use one of "
                            f"{', '.join(allowed)} (--method)")
    lo = 2 if convention == "ddpm" else 1
    hi = num_timesteps if convention == "ddpm" else None
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < lo or (hi and steps > hi):
        raise SamplingError(f"steps must be an int in {lo}..{hi or 'inf'} for {method}, got {steps!r} (--steps)")
    c, s = model.in_channels, model.input_size
    if noise.ndim != 4 or tuple(noise.shape[1:]) != (c, s, s) or not noise.is_floating_point():
        raise SamplingError(f"noise must be float (B, {c}, {s}, {s}) for this model, got {tuple(noise.shape)}")
    if labels.shape != (noise.shape[0],) or labels.is_floating_point():
        raise SamplingError(f"labels must be an integer tensor of shape ({noise.shape[0]},), got "
                            f"{tuple(labels.shape)} {labels.dtype}")
    return convention


@torch.no_grad()
def sample(model, noise: torch.Tensor, labels: torch.Tensor, *, method: str, steps: int, cfg_scale: float = 1.0,
           guidance_interval: tuple[float, float] = (0.0, 1.0),
           generator: Union[torch.Generator, NoiseSource, None] = None, cfg_channels: Union[str, int] = "auto",
           path: str = "linear", num_timesteps: int = 1000, cls_cfg_scale: float | None = None,
           cls_noise: torch.Tensor | None = None, timestep_shift: float = 0.0) -> torch.Tensor:
    """Draw samples from ``model`` (anything ``repa_probe.checkpoint.load_model`` returns).

    Args:
        model: network ``model(x, t, y) -> (out, ...)`` with ``time_convention`` ("repa", "sit", "ddpm"), ``num_classes``,
            ``in_channels``, ``input_size``; called in ``noise.dtype`` (wrap in autocast for bf16).
        noise: (B, C, H, W) initial Gaussian noise. labels: (B,) int64 classes.
        method: "euler", "heun", "sde" (flow families) or "ddpm", "ddim" (DiT).
        steps: ODE/SDE steps (heun: 2 * steps - 1 evaluations) or respaced DDPM steps.
        cfg_scale: guidance w (1 = conditional only); guidance_interval: (low, high) in REPA time.
        generator: per-step noise of "sde"/"ddpm": a torch.Generator (drawn as the official code does), a
            ``NoiseSource`` (per-sample seeding), or None (global RNG).
        cfg_channels: "auto" (repa all, ddpm/sit the first 3, as DiT's and SiT's forward_with_cfg), "all" or k (the first k channels are guided).
        path: flow interpolant of the model ("linear" or "cosine"; only the SDE's score uses it).
        num_timesteps: T of a DiT model's diffusion (1000).
        cls_cfg_scale: REG models: guidance of the class token (None: ``cfg_scale``; <= 0: its conditional
            velocity), applied where the image is guided.
        cls_noise: REG models: initial class-token noise ``(B, cls_token_dim)`` (None: drawn from ``generator``
            after nothing else, as REG's ``generate.py`` draws it after the latents and labels).
        timestep_shift: LightningDiT's grid shift s of "euler" / "heun" (0 = off; theirs: 0.3), see
            :func:`repa_probe.sampling.flow.shift_time`; not for REG models.
    Returns:
        (B, C, H, W) final latents in ``noise.dtype``, in the model's data space.
    """
    convention = _check_inputs(model, noise, labels, method, steps, num_timesteps)
    if timestep_shift and (method not in ("euler", "heun") or not timestep_shift > 0
                           or getattr(model, "cls_token_dim", 0)):
        raise SamplingError(f"timestep shift must be > 0 (0 = off) and applies to euler / heun of non-REG models, "
                            f"got {timestep_shift} with {method} (--timestep-shift)")
    guidance = make_guidance(model, cfg_scale, guidance_interval, cfg_channels, noise.shape[1])
    dtype, x = noise.dtype, noise.to(torch.float64)
    if getattr(model, "cls_token_dim", 0):
        cls = reg.initial_class_token(model, x.shape[0], cls_noise, generator, x.device)
        out = reg.sample_joint(model, x, cls, labels, method, steps, guidance,
                               cfg_scale if cls_cfg_scale is None else float(cls_cfg_scale),
                               _noise_fn(generator, torch.float64), generator, path, dtype)
    elif convention == "ddpm":
        out = _sample_ddpm(model, x, labels, method, steps, guidance, _noise_fn(generator, torch.float32),
                           num_timesteps, dtype)
    else:
        out = _sample_flow(model, convention, x, labels, method, steps, guidance, _noise_fn(generator, torch.float64),
                           path, dtype, timestep_shift)
    return out.to(dtype)


def _sample_flow(model, convention, x, labels, method, steps, guidance: Guidance, noise, path, dtype, shift):
    def velocity(state, t: float, active: bool) -> torch.Tensor:
        b = state.shape[0]
        t_in = model_input(torch.full((b,), t, dtype=torch.float64, device=state.device), convention).to(dtype)
        out = guided_output(model, state.to(dtype), t_in, labels, guidance, active)
        return sit_velocity_to_repa(out) if convention == "sit" else out

    if method == "sde":
        return flow.euler_maruyama(velocity, x, steps, guidance.active, noise, path)
    return flow.euler(velocity, x, steps, method == "heun", guidance.active, shift)


def _sample_ddpm(model, x, labels, method, steps, guidance: Guidance, noise, num_timesteps, dtype):
    diffusion = ddpm.respaced(num_timesteps, steps)
    kept = diffusion.timestep_map.tolist()

    def output(state, k: int) -> torch.Tensor:
        t_in = torch.full((state.shape[0],), kept[k], dtype=torch.int64, device=state.device)
        active = guidance.active(float(user_time(torch.tensor([kept[k]]), "ddpm", num_timesteps)))
        return guided_output(model, state.to(dtype), t_in, labels, guidance, active)

    return ddpm.diffusion_loop(output, x, diffusion, method, noise)
