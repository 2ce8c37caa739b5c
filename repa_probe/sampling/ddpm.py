"""DiT's discrete samplers over the respaced schedule ``space_timesteps(T, "N")``, float64 state, no clipping.

* ``"ddpm"`` — ``p_sample_loop``: ancestral steps with the learned-range variance (2C outputs; C outputs use
  the fixed "large" variance), noise drawn after the network call, none on the last step.
* ``"ddim"`` — ``ddim_sample_loop`` with eta = 0 (the variance channels are ignored).

The process is the training objective's own :class:`~repa_probe.objectives.ddpm.GaussianDiffusion`, respaced
(:meth:`~repa_probe.objectives.ddpm.GaussianDiffusion.respace`, as DiT's ``respace.py`` builds on
``GaussianDiffusion``): its tables and its reverse step (``p_mean_variance``, the learned-variance rule) are
the only ones. The network always receives the original step (``timestep_map``, 0..T-1).
"""
from __future__ import annotations

from typing import Callable

import torch

from repa_probe.objectives.ddpm import GaussianDiffusion, space_timesteps  # noqa: F401 (space_timesteps re-exported)


def respaced(num_timesteps: int, count: int) -> GaussianDiffusion:
    """DiT's ``T``-step linear diffusion respaced to ``count`` steps (``timestep_map``: the kept steps)."""
    return GaussianDiffusion(num_timesteps).respace(count)


def diffusion_loop(output: Callable, x: torch.Tensor, diffusion: GaussianDiffusion, method: str,
                   noise: Callable) -> torch.Tensor:
    """Run ``method`` ("ddpm" | "ddim") of the respaced ``diffusion`` from ``x: (B, C, H, W)`` float64 at its
    noisiest step.

    ``output(x, k) -> (B, C or 2C, H, W)`` float64 raw network output at respaced index k (guided; 2C =
    learned variance); ``noise(step, x) -> (B, C, H, W)`` float64 N(0, I). Returns float64 ``(B, C, H, W)``.
    """
    c = x.shape[1]
    for step, k in enumerate(reversed(range(diffusion.num_timesteps))):
        out = output(x, k)
        if diffusion.learn_sigma != (out.shape[1] == 2 * c):  # the network decides (2C: learned variance)
            diffusion = _with_learn_sigma(diffusion, out.shape[1] == 2 * c)
        t = torch.full((x.shape[0],), k, dtype=torch.int64, device=x.device)
        if method == "ddim":
            x0 = diffusion.predict_x0_from_eps(x, t, out[:, :c])
            eps = diffusion.predict_eps_from_x0(x, t, x0)
            abar_prev = diffusion.extract("alphas_cumprod_prev", t, x)
            x = x0 * abar_prev.sqrt() + (1.0 - abar_prev).sqrt() * eps
            continue
        p = diffusion.p_mean_variance(out, x, t)
        x = p["mean"] + torch.exp(0.5 * p["log_variance"]) * noise(step, x) if k > 0 else p["mean"]
    return x


def _with_learn_sigma(diffusion: GaussianDiffusion, learn_sigma: bool) -> GaussianDiffusion:
    """The same process (same tables and step map) reading ``learn_sigma`` outputs."""
    out = GaussianDiffusion(betas=diffusion.tables["betas"], learn_sigma=learn_sigma, rescale_vb=diffusion.rescale_vb)
    out.timestep_map = diffusion.timestep_map
    return out
