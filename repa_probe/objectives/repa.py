"""Representation alignment (REPA) loss, iREPA's spatial normalisation of the targets, encoder-token grid
matching and label dropout."""

from __future__ import annotations

import logging
import math
import numbers
from typing import Sequence

import torch
import torch.nn.functional as F

from repa_probe.objectives._common import ObjectiveError

log = logging.getLogger(__name__)
AMPLIFICATION_WARNING = 1e3  # (1 - gamma) |mean| / (std + eps) above this: a near-constant channel dominates
_amplification_checked = False  # the first call per process checks (one host sync), later calls never sync


def repa_loss(zs_tilde: Sequence[torch.Tensor], zs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """REPA's projection loss: minus the mean per-token cosine similarity, computed in float32.

    Both sides are cast to float32 and L2-normalised along the last dim (normalising in fp16 overflows for
    large activations and gives NaN, sihyun-yu/REPA#46); then cos = <z_tilde, z> per token, averaged over
    tokens, batch and encoders (equal to REPA's per-sample token mean summed and divided by encoders x batch).

    Args:
        zs_tilde: one `(B, T, D_k)` projector output per encoder (the model's `zs`); gradients flow into these.
        zs: one `(B, T, D_k)` frozen encoder token tensor per encoder, same order and shapes.
    Returns:
        `(loss, mean_cos)`: float32 scalars; loss = -mean_cos, in [-1, 1]. `mean_cos` is detached (for logging).
    """
    zs_tilde, zs = list(zs_tilde), list(zs)
    if len(zs_tilde) != len(zs):
        raise ObjectiveError(
            f"the model has {len(zs_tilde)} projector(s) but {len(zs)} encoder feature tensor(s) were given: set "
            "the model's z_dims to one entry per target encoder"
        )
    if not zs:
        raise ObjectiveError("repa_loss got no features: the model has no projectors (set z_dims) or no encoders")
    per_encoder = []
    for k, (zt, z) in enumerate(zip(zs_tilde, zs)):
        if zt.ndim != 3 or z.ndim != 3:
            raise ObjectiveError(f"encoder {k}: features must be (B, T, D), got projector {tuple(zt.shape)} and "
                                 f"encoder {tuple(z.shape)}")
        if zt.shape[0] != z.shape[0]:
            raise ObjectiveError(f"encoder {k}: batch size differs: projector {zt.shape[0]} vs encoder {z.shape[0]}")
        if zt.shape[1] != z.shape[1]:
            raise ObjectiveError(
                f"encoder {k}: token count differs: model has {zt.shape[1]} tokens, encoder gives {z.shape[1]}: "
                "set the encoder resolution so that the grids agree, or resize with match_token_grid"
            )
        if zt.shape[2] != z.shape[2]:
            raise ObjectiveError(
                f"encoder {k}: projector output dim {zt.shape[2]} != encoder dim {z.shape[2]}: set the model's "
                f"z_dims[{k}] to the encoder's embed_dim ({z.shape[2]})"
            )
        a = F.normalize(zt.float(), dim=-1)
        b = F.normalize(z.float(), dim=-1)
        per_encoder.append((a * b).sum(dim=-1).mean())
    mean_cos = torch.stack(per_encoder).mean()
    return -mean_cos, mean_cos.detach()


def spatial_normalize(z: torch.Tensor, gamma: float = 1.0, eps: float = 1e-6) -> torch.Tensor:
    """iREPA's spatial normalisation of encoder target tokens: ``(z - gamma * mean_T z) / (std_T z + eps)``.

    z: ``(B, T, D)`` -> ``(B, T, D)`` float32 (computed in float32 whatever z's dtype). The mean and the std are
    over the token axis (dim 1), per image and channel; the std is the unbiased one (divides by T - 1) and eps is
    added to the std, not inside the square root (iREPA's code; the paper writes sqrt(Var + eps)). gamma in
    [0, 1]: 1 makes every channel zero-mean and unit-std over tokens; iREPA's SiT trainer uses 0.6, its JiT
    trainer 0.8. Applied to the targets only, never to the diffusion features.

    With gamma < 1 a channel whose spatial std is ~0 but whose mean is not becomes ~(1 - gamma) * mean / eps, which
    dominates every token; the first call in a process checks for this (one host sync) and logs a warning when
    ``(1 - gamma) |mean| / (std + eps)`` exceeds ``AMPLIFICATION_WARNING``.
    """
    global _amplification_checked
    if z.ndim != 3 or z.shape[1] < 2:
        raise ObjectiveError(f"spatial normalisation needs tokens (B, T >= 2, D), got shape {tuple(z.shape)}")
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not 0.0 <= gamma <= 1.0:
        raise ObjectiveError(f"repa.spatial_norm_gamma must be a number in [0, 1], got {gamma!r}")
    x = z.float()
    mean = x.mean(dim=1, keepdim=True)
    std = x.std(dim=1, keepdim=True)
    if gamma < 1 and x.numel() and not _amplification_checked and not torch.compiler.is_compiling():
        _amplification_checked = True
        worst = ((1 - gamma) * mean.abs() / (std + eps)).max().item()
        if worst > AMPLIFICATION_WARNING:
            log.warning("spatial normalisation (gamma=%g): a channel with near-zero spatial std is amplified %.3g x "
                        "and dominates the targets; use repa.spatial_norm_gamma=1 or check the encoder", gamma, worst)
    return (x - gamma * mean) / (std + eps)


def match_token_grid(z: torch.Tensor, grid: int) -> torch.Tensor:
    """Resize encoder tokens `(B, T_enc, D)` on their square token grid to the model's `(B, grid * grid, D)`.

    The encoder side is resampled, never the model: the diffusion transformer's grid is fixed by the latent
    size and patch size (input_size // patch_size), while the frozen target features can be resampled without
    changing the model. Tokens are in raster order (row by row) on a sqrt(T_enc) x sqrt(T_enc) grid, the same
    order as the model's patch flattening. Resizing is bilinear with align_corners=False, with antialiasing
    when shrinking; it runs in float32 and the result has z's dtype. When the grids already agree, `z` itself
    is returned. Tokens that are not a square grid (e.g. CLS or register tokens still attached) raise
    `ObjectiveError`.
    """
    if z.ndim != 3:
        raise ObjectiveError(f"encoder tokens must be (B, T, D), got shape {tuple(z.shape)}")
    if isinstance(grid, bool) or not isinstance(grid, numbers.Integral) or grid < 1:
        raise ObjectiveError(f"grid must be a positive int (the model's input_size // patch_size), got {grid!r}")
    b, t, d = z.shape
    side = math.isqrt(t)
    if side * side != t:
        raise ObjectiveError(
            f"encoder gives {t} tokens, which is not a square grid: pass patch tokens only (drop CLS/register tokens)"
        )
    if side == grid:
        return z
    img = z.float().reshape(b, side, side, d).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=(grid, grid), mode="bilinear", align_corners=False, antialias=grid < side)
    return img.permute(0, 2, 3, 1).reshape(b, grid * grid, d).to(z.dtype)


def drop_labels(y: torch.Tensor, prob: float, null_class: int,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Classifier-free-guidance label dropout: replace each label by `null_class` with probability `prob`.

    `y: (B,)` integer labels -> new `(B,)` tensor (y is not modified). Always draws B uniforms from `generator`
    (on y's device), so the random stream does not depend on `prob`. This is the only place labels are dropped;
    the model never drops them itself.
    """
    if y.ndim != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ObjectiveError(f"labels must be a 1-D integer tensor (B,), got shape {tuple(y.shape)} dtype {y.dtype}")
    if isinstance(prob, bool) or not isinstance(prob, numbers.Real) or not 0.0 <= prob <= 1.0:
        raise ObjectiveError(f"label dropout prob must be a number in [0, 1], got {prob!r}")
    if isinstance(null_class, bool) or not isinstance(null_class, numbers.Integral) or null_class < 0:
        raise ObjectiveError(f"null_class must be a non-negative int (usually num_classes), got {null_class!r}")
    if generator is not None and generator.device.type != y.device.type:
        raise ObjectiveError(f"generator is on {generator.device} but labels are on {y.device}: use one device")
    drop = torch.rand(y.shape, generator=generator, device=y.device) < prob
    return torch.where(drop, torch.full_like(y, int(null_class)), y)
