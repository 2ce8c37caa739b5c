"""Flow matching (stochastic interpolants) in REPA time: t=0 is data, t=1 is noise.

    x_t = alpha(t) * x0 + sigma(t) * eps,        target v = alpha'(t) * x0 + sigma'(t) * eps

Paths (as REPA's `SILoss.interpolant`):
    linear: alpha = 1 - t,           sigma = t,           alpha' = -1,                sigma' = 1   (v = eps - x0)
    cosine: alpha = cos(pi t / 2),   sigma = sin(pi t / 2), alpha' = -pi/2 sin(pi t/2), sigma' = pi/2 cos(pi t/2)

Official SiT (willisma/SiT) runs time the other way (t=0 noise, t=1 data) and predicts u = dx/dt_sit. Its
Linear path is REPA's linear path and its GVP path is REPA's cosine path with t_sit = 1 - t, and since time runs
backwards the velocity flips sign: v = -u. `sit_velocity_to_repa` / `repa_velocity_to_sit` convert velocities;
time itself is converted in `repa_probe.timesteps` (the one owner of time conventions).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from repa_probe.objectives._common import (Objective, ObjectiveError, check_sample_args, check_same_shape, expand_time,
                                           mean_flat)
from repa_probe.timesteps import model_input

PATHS = ("linear", "cosine")
PREDICTIONS = ("v",)
WEIGHTINGS = ("uniform", "lognormal")


def sit_velocity_to_repa(u_sit: torch.Tensor) -> torch.Tensor:
    """Official SiT velocity u = d x / d t_sit -> REPA velocity v = d x / d t = -u (time runs backwards)."""
    return -u_sit


def repa_velocity_to_sit(v: torch.Tensor) -> torch.Tensor:
    """REPA velocity v = d x / d t -> official SiT velocity u = -v."""
    return -v


class FlowMatching(Objective):
    """Velocity-prediction flow matching, REPA's `SILoss` denoising part.

    Args:
        path: "linear" (REPA default) or "cosine".
        prediction: only "v" (velocity), as in REPA.
        weighting: "uniform" (t ~ U[0, 1), REPA default) or "lognormal" (EDM-style: sigma = exp(N(mean, std)),
            t = sigma / (1 + sigma) on the linear path, 2/pi * atan(sigma) on the cosine path). It only changes
            how t is sampled; the loss has no per-sample weight.
        lognormal_mean, lognormal_std: parameters of the normal behind the lognormal sigma (0 and 1; REPA's
            code references P_mean / P_std without defining them, N(0, 1) is the documented choice). On the
            linear path lognormal t = sigmoid(N(mean, std)) is LightningDiT's logit-normal sampling (theirs draws
            t_sit = sigmoid(n) in SiT time; 1 - sigmoid(n) = sigmoid(-n) has the same law for mean 0).
        cosine_weight: weight of LightningDiT's velocity-direction term ``1 - cos(v_pred, v)``, the cosine taken
            over channels at every position and averaged over (H, W) (their ``use_cosine_loss``: weight 1).
    """

    time_convention = "repa"

    def __init__(self, path: str = "linear", prediction: str = "v", weighting: str = "uniform",
                 lognormal_mean: float = 0.0, lognormal_std: float = 1.0, cosine_weight: float = 0.0):
        if path not in PATHS:
            raise ObjectiveError(f"unknown flow path {path!r}: choose one of {PATHS}")
        if prediction not in PREDICTIONS:
            raise ObjectiveError(f"unknown prediction {prediction!r}: FlowMatching supports only {PREDICTIONS}")
        if weighting not in WEIGHTINGS:
            raise ObjectiveError(f"unknown weighting {weighting!r}: choose one of {WEIGHTINGS}")
        if not lognormal_std > 0:
            raise ObjectiveError(f"lognormal_std must be > 0, got {lognormal_std}")
        if not cosine_weight >= 0:
            raise ObjectiveError(f"cosine_weight must be >= 0, got {cosine_weight}")
        self.path = path
        self.prediction = prediction
        self.weighting = weighting
        self.lognormal_mean = float(lognormal_mean)
        self.lognormal_std = float(lognormal_std)
        self.cosine_weight = float(cosine_weight)

    def __repr__(self) -> str:
        cosine = f", cosine_weight={self.cosine_weight:g}" if self.cosine_weight else ""
        return (f"FlowMatching(path={self.path!r}, prediction={self.prediction!r}, weighting={self.weighting!r}"
                f"{cosine})")

    # ---------------------------------------------------------------- interpolant
    def interpolant(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Coefficients `(alpha, sigma, d_alpha, d_sigma)` at float times `t` (any shape), each shaped like t."""
        if not torch.is_floating_point(t):
            raise ObjectiveError(f"flow-matching time must be a float tensor in [0, 1], got dtype {t.dtype}")
        if self.path == "linear":
            return 1.0 - t, t, torch.full_like(t, -1.0), torch.ones_like(t)
        half_pi = math.pi / 2
        c, s = torch.cos(half_pi * t), torch.sin(half_pi * t)
        return c, s, -half_pi * s, half_pi * c

    def _coefficients(self, t: torch.Tensor, x: torch.Tensor):
        """Interpolant coefficients broadcast to `x: (B, ...)` and cast to x's dtype."""
        return tuple(c.to(x.dtype) for c in self.interpolant(expand_time(t, x)))

    # ---------------------------------------------------------------- interface
    def sample_t(self, batch: int, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
        """Training times `t: (B,)` float32 on `device`: U[0, 1) or lognormal (strictly inside (0, 1))."""
        device = check_sample_args(batch, generator, device)
        if self.weighting == "uniform":
            return torch.rand(batch, generator=generator, device=device, dtype=torch.float32)
        n = torch.randn(batch, generator=generator, device=device, dtype=torch.float32)
        n = n * self.lognormal_std + self.lognormal_mean
        if self.path == "linear":
            return torch.sigmoid(n)  # = sigma / (1 + sigma) with sigma = exp(n), without overflow
        return torch.atan(torch.exp(n)) * (2.0 / math.pi)

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """`x_t = alpha(t) x0 + sigma(t) noise`; `x0, noise: (B, C, H, W)`, `t: (B,)` -> `(B, C, H, W)` in x0's dtype."""
        check_same_shape(x0=x0, noise=noise)
        alpha, sigma, _, _ = self._coefficients(t, x0)
        return alpha * x0 + sigma * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Velocity target `v = alpha'(t) x0 + sigma'(t) noise` (`eps - x0` on the linear path), shape of x0."""
        check_same_shape(x0=x0, noise=noise)
        _, _, d_alpha, d_sigma = self._coefficients(t, x0)
        return d_alpha * x0 + d_sigma * noise

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """What a ``repa``-convention network receives: the raw REPA time t in [0, 1] (not scaled by 1000)."""
        return model_input(t, self.time_convention)

    def loss(self, model_out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, noise: torch.Tensor,
             t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample velocity MSE, mean over (C, H, W), computed in float32.

        Args:
            model_out: `(B, C', H, W)` network output with C' >= C; when C' > C (a learned-sigma head, e.g. an
                official SiT / DiT network) only the first C channels are the velocity and the rest is ignored.
            x0, noise: `(B, C, H, W)` data and noise that produced `x_t` (x_t is unused: the target needs only
                x0 and noise; it is part of the common interface).
            t: `(B,)` float times.
        Returns:
            dict(loss=(B,), denoise=(B,)) float32, the same tensor without the cosine term; with
            ``cosine_weight`` w also ``cos_loss: (B,)`` (mean over (H, W) of 1 - cos over C; their name) and
            loss = denoise + w cos_loss.
        """
        check_same_shape(x0=x0, noise=noise)
        if model_out.ndim != x0.ndim or model_out.shape[0] != x0.shape[0] or model_out.shape[2:] != x0.shape[2:] \
                or model_out.shape[1] < x0.shape[1]:
            raise ObjectiveError(
                f"model output {tuple(model_out.shape)} does not fit the target {tuple(x0.shape)}: need the same "
                "batch and spatial size and at least as many channels"
            )
        pred = model_out[:, : x0.shape[1]].float()
        target = self.target(x0.float(), noise.float(), t)
        err = mean_flat((pred - target) ** 2)
        if not self.cosine_weight:
            return {"loss": err, "denoise": err}
        cos = mean_flat(1.0 - F.cosine_similarity(pred, target, dim=1))
        return {"loss": err + self.cosine_weight * cos, "denoise": err, "cos_loss": cos}

