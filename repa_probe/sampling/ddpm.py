"""DiT's discrete samplers over the respaced schedule ``space_timesteps(T, "N")``, float64 state, no clipping.

* ``"ddpm"`` — ``p_sample_loop``: ancestral steps with the learned-range variance (2C outputs; C outputs use
  the fixed "large" variance), noise drawn after the network call, none on the last step.
* ``"ddim"`` — ``ddim_sample_loop`` with eta = 0 (the variance channels are ignored).
The network always receives the original step (0..T-1).
"""
from __future__ import annotations

from typing import Callable

import torch

from repa_probe.objectives.ddpm import linear_betas


def space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """DiT/ADM's kept steps for one section of ``count`` steps, ascending (``round`` of an accumulated stride)."""
    stride = 1 if count <= 1 else (num_timesteps - 1) / (count - 1)
    cur, kept = 0.0, []
    for _ in range(count):
        kept.append(round(cur))
        cur += stride
    return sorted(set(kept))


def respaced_schedule(num_timesteps: int, count: int) -> dict[str, torch.Tensor]:
    """Float64 ``(K,)`` tables of the respaced process (``betas'_k = 1 - abar_{t_k} / abar_{t_{k-1}}``)
    plus ``timesteps`` (int64 original steps)."""
    kept = space_timesteps(num_timesteps, count)
    abar_full = torch.cumprod(1.0 - linear_betas(num_timesteps), dim=0)
    abar_kept = abar_full[kept]
    betas = 1.0 - abar_kept / torch.cat([torch.ones(1, dtype=torch.float64), abar_kept[:-1]])
    abar = torch.cumprod(1.0 - betas, dim=0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    return {
        "timesteps": torch.tensor(kept, dtype=torch.int64),
        "betas": betas, "alphas_cumprod": abar, "alphas_cumprod_prev": abar_prev,
        "sqrt_recip": torch.sqrt(1.0 / abar), "sqrt_recipm1": torch.sqrt(1.0 / abar - 1.0),
        "coef1": betas * torch.sqrt(abar_prev) / (1.0 - abar),
        "coef2": (1.0 - abar_prev) * torch.sqrt(1.0 - betas) / (1.0 - abar),
        "log_betas": torch.log(betas),
        "post_log_var": torch.log(torch.cat([post_var[1:2], post_var[1:]])),
        "large_log_var": torch.log(torch.cat([post_var[1:2], betas[1:]])),
    }


def diffusion_loop(output: Callable, x: torch.Tensor, sched: dict, method: str, noise: Callable) -> torch.Tensor:
    """Run ``method`` ("ddpm" | "ddim") from ``x: (B, C, H, W)`` float64 at the noisiest kept step.

    ``output(x, k) -> (B, C or 2C, H, W)`` float64 raw network output at respaced index k (guided);
    ``noise(step, x) -> (B, C, H, W)`` float64 N(0, I). Returns float64 ``(B, C, H, W)``.
    """
    c = x.shape[1]
    s = {k: v.tolist() for k, v in sched.items()}
    num = len(s["timesteps"])
    for step, k in enumerate(reversed(range(num))):
        out = output(x, k)
        eps = out[:, :c]
        x0 = s["sqrt_recip"][k] * x - s["sqrt_recipm1"][k] * eps
        if method == "ddim":
            eps = (s["sqrt_recip"][k] * x - x0) / s["sqrt_recipm1"][k]
            x = x0 * s["alphas_cumprod_prev"][k] ** 0.5 + (1.0 - s["alphas_cumprod_prev"][k]) ** 0.5 * eps
            continue
        mean = s["coef1"][k] * x0 + s["coef2"][k] * x
        if out.shape[1] == 2 * c:
            frac = (out[:, c:] + 1.0) / 2.0
            log_var = frac * s["log_betas"][k] + (1.0 - frac) * s["post_log_var"][k]
        else:
            log_var = torch.full_like(mean, s["large_log_var"][k])
        x = mean + torch.exp(0.5 * log_var) * noise(step, x) if k > 0 else mean
    return x
