"""Training objectives, model-agnostic (docs/design.md, `repa_probe.objectives`).

- `FlowMatching`: REPA/SiT velocity objective in REPA time (t=0 data, t=1 noise).
- `GaussianDiffusion`: DiT's DDPM objective (epsilon + learned-range variance, hybrid loss) in integer steps.
- `repa_loss`, `spatial_normalize` (iREPA), `match_token_grid`, `drop_labels`: the alignment loss and its helpers.
- `attention_loss`, `AttentionTap` (HASTE): attention-map alignment.

The trainer composes these: sample t and noise, `add_noise`, run the model on `model_time(t)`, then
`loss(...)["loss"].mean() + proj_coeff * repa_loss(zs_tilde, zs)[0]`.
"""

from repa_probe.objectives._common import Objective, ObjectiveError, mean_flat
from repa_probe.objectives.ddpm import (GaussianDiffusion, approx_standard_normal_cdf, discretized_gaussian_log_likelihood, linear_betas,
                   normal_kl)
from repa_probe.objectives.flow import FlowMatching, repa_velocity_to_sit, sit_velocity_to_repa
from repa_probe.timesteps import repa_time_to_sit, sit_time_to_repa  # re-exported: time lives in repa_probe.timesteps
from repa_probe.objectives.repa import drop_labels, match_token_grid, repa_loss, spatial_normalize
from repa_probe.objectives.haste import AttentionTap, attention_loss

__all__ = [
    "Objective", "ObjectiveError", "mean_flat",
    "FlowMatching", "repa_time_to_sit", "sit_time_to_repa", "sit_velocity_to_repa", "repa_velocity_to_sit",
    "GaussianDiffusion", "linear_betas", "normal_kl", "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "repa_loss", "spatial_normalize", "match_token_grid", "drop_labels", "AttentionTap", "attention_loss",
]
