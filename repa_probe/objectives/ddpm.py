"""Discrete Gaussian diffusion (DDPM) as trained by DiT / ADM: epsilon prediction with a learned-range variance.

Time is the integer step t in 0..T-1 (t = T-1 is the noisiest), fed to the network as is.

    q(x_t | x_0)          = N(sqrt(abar_t) x_0, (1 - abar_t) I)
    q(x_{t-1} | x_t, x_0) = N(c1_t x_0 + c2_t x_t, beta~_t I),   beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)

With `learn_sigma` the network returns 2C channels: C for epsilon and C values v in [-1, 1] that interpolate the
log variance between log beta~_t (v = -1) and log beta_t (v = +1). The training loss is the hybrid
`mse(eps) + vb`, where vb is the variational-bound term in bits per dimension computed with the epsilon half
detached, so that vb trains only the variance. The schedule is built in float64 and looked up in float32.
"""

from __future__ import annotations

import math

import numbers

import torch

from repa_probe.objectives._common import (Objective, ObjectiveError, check_sample_args, check_same_shape, expand_time,
                                           mean_flat)
from repa_probe.timesteps import model_input

BETA_SCHEDULES = ("linear",)
_LN2 = math.log(2.0)


def linear_betas(num_timesteps: int) -> torch.Tensor:
    """Ho et al.'s linear schedule scaled to T steps: float64 `(T,)` from 1e-4 * 1000/T to 0.02 * 1000/T."""
    scale = 1000.0 / num_timesteps
    return torch.linspace(1e-4 * scale, 0.02 * scale, num_timesteps, dtype=torch.float64)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor,
              logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL( N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)) ) in nats; arguments broadcast."""
    return 0.5 * (logvar2 - logvar1 - 1.0 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF used by ADM's decoder likelihood."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor,
                                        bin_width: float = 2.0 / 255.0) -> torch.Tensor:
    """Log-probability (nats, elementwise) of `x` under a Gaussian discretised into bins of `bin_width`.

    `x` is taken to be 8-bit data rescaled to [-1, 1] (bin width 2/255): the probability of a value is the
    Gaussian mass in [x - w/2, x + w/2], and the two edge bins (x < -0.999, x > 0.999) extend to -inf / +inf.
    `x, means, log_scales` must have the same shape; returns that shape.
    """
    check_same_shape(x=x, means=means, log_scales=log_scales)
    half = bin_width / 2.0
    inv_std = torch.exp(-log_scales)
    centred = x - means
    cdf_hi = approx_standard_normal_cdf(inv_std * (centred + half))
    cdf_lo = approx_standard_normal_cdf(inv_std * (centred - half))
    log_cdf_hi = torch.log(cdf_hi.clamp(min=1e-12))
    log_one_minus_cdf_lo = torch.log((1.0 - cdf_lo).clamp(min=1e-12))
    log_delta = torch.log((cdf_hi - cdf_lo).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_hi, torch.where(x > 0.999, log_one_minus_cdf_lo, log_delta))


def space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """DiT/ADM's kept steps for one section of ``count`` steps, ascending (``round`` of an accumulated stride)."""
    stride = 1 if count <= 1 else (num_timesteps - 1) / (count - 1)
    cur, kept = 0.0, []
    for _ in range(count):
        kept.append(round(cur))
        cur += stride
    return sorted(set(kept))


def schedule_tables(betas: torch.Tensor) -> dict[str, torch.Tensor]:
    """The one computation of the float64 ``(T,)`` tables of a diffusion with ``betas`` (forward process,
    posterior q(x_{t-1} | x_t, x_0), fixed variances); the training schedule and its respaced samplers alike."""
    alphas = 1.0 - betas
    abar = torch.cumprod(alphas, dim=0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    # beta~_0 = 0: its log is clipped to beta~_1 (the t=0 term is the decoder NLL anyway).
    post_var_clipped = torch.cat([post_var[1:2], post_var[1:]])
    fixed_large = torch.cat([post_var[1:2], betas[1:]])
    return {
        "betas": betas,
        "log_betas": torch.log(betas),
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": abar_prev,
        "sqrt_alphas_cumprod": torch.sqrt(abar),
        "sqrt_one_minus_alphas_cumprod": torch.sqrt(1.0 - abar),
        "sqrt_recip_alphas_cumprod": torch.sqrt(1.0 / abar),
        "sqrt_recipm1_alphas_cumprod": torch.sqrt(1.0 / abar - 1.0),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": torch.log(post_var_clipped),
        "posterior_mean_coef1": betas * torch.sqrt(abar_prev) / (1.0 - abar),
        "posterior_mean_coef2": (1.0 - abar_prev) * torch.sqrt(alphas) / (1.0 - abar),
        "fixed_large_variance": fixed_large,
        "fixed_large_log_variance": torch.log(fixed_large),
    }


class GaussianDiffusion(Objective):
    """DiT's training diffusion: linear betas, epsilon prediction, LEARNED_RANGE variance, hybrid loss.

    Args:
        num_timesteps: T, the number of diffusion steps (1000 for DiT).
        beta_schedule: only "linear".
        learn_sigma: the network returns 2C channels (epsilon, variance interpolation) and the loss adds the vb
            term; without it the network returns C channels, the loss is the plain epsilon MSE and the variance
            used by `p_mean_variance` is the fixed "large" one (beta_t, with beta~_1 at t=0), as DiT.
        rescale_vb: multiply vb by T / 1000 (improved-DDPM's RESCALED_MSE). For T = 1000, the DiT setting, the
            factor is exactly 1, so this matches DiT's loss either way.
        betas: float64 ``(T,)`` betas instead of the linear schedule (a respaced process, see :meth:`respace`);
            ``num_timesteps`` is then ``len(betas)``.

    ``timestep_map``: int64 ``(T,)`` step fed to the network at each step of this process (the identity, or the
    kept steps of the original schedule after :meth:`respace`).
    """

    time_convention = "ddpm"

    def __init__(self, num_timesteps: int = 1000, beta_schedule: str = "linear", learn_sigma: bool = True,
                 rescale_vb: bool = True, betas: torch.Tensor | None = None):
        if betas is not None:
            num_timesteps = len(betas)
        if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, numbers.Integral) or num_timesteps < 2:
            raise ObjectiveError(f"num_timesteps must be an int >= 2, got {num_timesteps!r}")
        if beta_schedule not in BETA_SCHEDULES:
            raise ObjectiveError(f"unknown beta_schedule {beta_schedule!r}: choose one of {BETA_SCHEDULES}")
        self.num_timesteps = int(num_timesteps)
        self.beta_schedule = beta_schedule
        self.learn_sigma = bool(learn_sigma)
        self.rescale_vb = bool(rescale_vb)
        #: float64 (T,) schedule tables; `_table(name, device, dtype)` gives cached copies.
        self.tables: dict[str, torch.Tensor] = schedule_tables(
            linear_betas(self.num_timesteps) if betas is None else betas.to(torch.float64))
        self.timestep_map = torch.arange(self.num_timesteps, dtype=torch.int64)
        self._cache: dict[tuple, torch.Tensor] = {}

    def respace(self, count: int, learn_sigma: bool | None = None) -> "GaussianDiffusion":
        """The process over ``space_timesteps(T, count)`` kept steps, built on this schedule as DiT's
        ``SpacedDiffusion`` (``betas'_k = 1 - abar_{t_k} / abar_{t_{k-1}}``); its ``timestep_map`` holds the
        original steps the network receives. ``learn_sigma``: of the network output (default: this one's)."""
        kept = self.timestep_map[space_timesteps(self.num_timesteps, count)]
        abar = self.tables["alphas_cumprod"][kept]
        betas = 1.0 - abar / torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        out = GaussianDiffusion(betas=betas, learn_sigma=self.learn_sigma if learn_sigma is None else learn_sigma,
                                rescale_vb=self.rescale_vb)
        out.timestep_map = kept
        return out

    def __repr__(self) -> str:
        return (f"GaussianDiffusion(num_timesteps={self.num_timesteps}, beta_schedule={self.beta_schedule!r}, "
                f"learn_sigma={self.learn_sigma})")

    # ---------------------------------------------------------------- lookup helpers
    def _table(self, name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        key = (name, device, dtype)
        if key not in self._cache:
            self._cache[key] = self.tables[name].to(dtype).to(device)
        return self._cache[key]

    def extract(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Look up schedule table `name` at integer steps `t: (B,)` -> `(B, 1, ..., 1)` matching `x`: float64
        when `x` is float64 (the samplers), else float32."""
        if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise ObjectiveError(f"DDPM timesteps must be an integer tensor of steps 0..T-1, got dtype {t.dtype}")
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return expand_time(self._table(name, t.device, dtype)[t.long()], x)

    def _split(self, model_out: torch.Tensor, x_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Split `(B, 2C, H, W)` (learn_sigma) or check `(B, C, H, W)` -> (eps, variance values or None)."""
        c = x_t.shape[1]
        want = 2 * c if self.learn_sigma else c
        if model_out.shape != (x_t.shape[0], want, *x_t.shape[2:]):
            hint = ("set learn_sigma to match the model" if model_out.shape[1] in (c, 2 * c)
                    else "check the model's in_channels / input_size")
            raise ObjectiveError(
                f"model output {tuple(model_out.shape)} does not fit x_t {tuple(x_t.shape)} with "
                f"learn_sigma={self.learn_sigma} (expected {want} channels): {hint}"
            )
        if self.learn_sigma:
            return model_out[:, :c], model_out[:, c:]
        return model_out, None

    # ---------------------------------------------------------------- forward process
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """`x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`; `x0, noise: (B, C, H, W)`, `t: (B,)` int, x0's dtype."""
        check_same_shape(x0=x0, noise=noise)
        a = self.extract("sqrt_alphas_cumprod", t, x0).to(x0.dtype)
        s = self.extract("sqrt_one_minus_alphas_cumprod", t, x0).to(x0.dtype)
        return a * x0 + s * noise

    def q_posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor,
                                  t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Posterior q(x_{t-1} | x_t, x0): `(mean, variance, log_variance_clipped)`, each `(B, C, H, W)`.

        Arithmetic with the float32 tables, so results are at least float32.
        """
        check_same_shape(x0=x0, x_t=x_t)
        mean = self.extract("posterior_mean_coef1", t, x_t) * x0 + self.extract("posterior_mean_coef2", t, x_t) * x_t
        var = self.extract("posterior_variance", t, x_t).expand_as(mean)
        log_var = self.extract("posterior_log_variance_clipped", t, x_t).expand_as(mean)
        return mean, var, log_var

    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """`x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`; shapes `(B, C, H, W)`, at least float32."""
        check_same_shape(x_t=x_t, eps=eps)
        return (self.extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                - self.extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)

    def predict_eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Inverse of `predict_x0_from_eps`; shapes `(B, C, H, W)`, at least float32."""
        check_same_shape(x_t=x_t, x0=x0)
        return ((self.extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x0)
                / self.extract("sqrt_recipm1_alphas_cumprod", t, x_t))

    # ---------------------------------------------------------------- reverse process
    def p_mean_variance(self, model_out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                        clip_denoised: bool = False) -> dict[str, torch.Tensor]:
        """The model's reverse step p(x_{t-1} | x_t) from its raw output (for samplers and the vb term).

        Args:
            model_out: `(B, 2C, H, W)` with learn_sigma (epsilon, variance values in [-1, 1]) else `(B, C, H, W)`.
            x_t: `(B, C, H, W)`; t: `(B,)` integer steps.
            clip_denoised: clamp the predicted x0 to [-1, 1] (pixel data only; DiT's latents are not clipped).
        Returns:
            dict with `mean`, `variance`, `log_variance`, `pred_x0`, `eps`, each `(B, C, H, W)`, at least float32.
        """
        eps, var_values = self._split(model_out, x_t)
        if var_values is None:
            log_var = self.extract("fixed_large_log_variance", t, x_t).expand_as(x_t)
        else:
            min_log = self.extract("posterior_log_variance_clipped", t, x_t)
            max_log = self.extract("log_betas", t, x_t)
            frac = (var_values + 1.0) / 2.0
            log_var = frac * max_log + (1.0 - frac) * min_log
        pred_x0 = self.predict_x0_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        return {"mean": mean, "variance": torch.exp(log_var), "log_variance": log_var, "pred_x0": pred_x0,
                "eps": eps}

    def vb_terms_bpd(self, model_out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
                     t: torch.Tensor) -> torch.Tensor:
        """Variational-bound term per sample in bits per dimension, `(B,)`.

        For t > 0: KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) averaged over (C, H, W), / ln 2. For t = 0: the
        discretised Gaussian decoder NLL of x0 (treated as [-1, 1] data with bin width 2/255), averaged, / ln 2.
        `model_out` as in `p_mean_variance` (the caller decides what is detached); no clipping of x0.
        """
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance(model_out, x_t, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / _LN2
        nll = -discretized_gaussian_log_likelihood(x0.to(out["mean"].dtype), out["mean"],
                                                   0.5 * out["log_variance"])
        nll = mean_flat(nll) / _LN2
        return torch.where(t == 0, nll, kl)

    # ---------------------------------------------------------------- interface
    def sample_t(self, batch: int, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
        """Training steps `t: (B,)` int64, uniform over 0..T-1."""
        device = check_sample_args(batch, generator, device)
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=device, dtype=torch.int64)

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Same as `q_sample`."""
        return self.q_sample(x0, t, noise)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """DiT's time embedder receives the integer step itself."""
        return model_input(t, self.time_convention)

    def loss(self, model_out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, noise: torch.Tensor,
             t: torch.Tensor) -> dict[str, torch.Tensor]:
        """DiT's training loss per sample, computed in float32.

        Args:
            model_out: `(B, 2C, H, W)` with learn_sigma, else `(B, C, H, W)`.
            x0, x_t, noise: `(B, C, H, W)`; t: `(B,)` integer steps.
        Returns:
            learn_sigma: dict(loss = mse + vb, mse, vb), each `(B,)`; the vb term sees the epsilon half detached
            (it trains only the variance) and is scaled by T / 1000 when `rescale_vb`.
            Otherwise dict(loss = mse, mse).
        """
        check_same_shape(x0=x0, x_t=x_t, noise=noise)
        eps, var_values = self._split(model_out, x_t)
        x0, x_t = x0.float(), x_t.float()
        mse = mean_flat((noise.float() - eps.float()) ** 2)
        if var_values is None:
            return {"loss": mse, "mse": mse}
        frozen = torch.cat([eps.detach(), var_values], dim=1).float()
        vb = self.vb_terms_bpd(frozen, x0, x_t, t)
        if self.rescale_vb:
            vb = vb * (self.num_timesteps / 1000.0)
        return {"loss": mse + vb, "mse": mse, "vb": vb}
