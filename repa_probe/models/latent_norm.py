"""REPA-E's latent normalisation: a ``BatchNorm2d(C, eps=1e-4, affine=False)`` on the clean latents.

The diffusion model owns it (state-dict keys ``bn.running_mean (C)``, ``bn.running_var (C)``,
``bn.num_batches_tracked``, as REPA-E's ``models/sit.py``), but it is applied to the *clean* latents before
noising, never inside ``forward``: the training step calls ``model.bn(z)`` and sampling / the analyses use
its (EMA) running statistics.

* train mode: batch statistics (per channel over B, H, W) normalise, and the running statistics move by
  ``momentum`` (unbiased variance, as ``nn.BatchNorm2d``). Under ``torch.distributed`` with more than one
  process the batch statistics are those of the GLOBAL batch (sums all-reduced: works with gloo on the CPU,
  where ``nn.SyncBatchNorm`` does not). The statistics are treated as constants for autograd (REPA-E's
  diffusion step normalises ``z.detach()``; the layer has no affine parameters).
* eval mode: ``(z - running_mean) / sqrt(running_var + eps)``.
* :meth:`denormalize` inverts with ``sqrt(running_var)`` and no eps, as REPA-E's ``generate.py``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

BN_EPS = 1e-4  # REPA-E's models/sit.py


class LatentBatchNorm(nn.BatchNorm2d):
    """``BatchNorm2d(C, eps=1e-4, momentum, affine=False)`` with global-batch statistics under DDP."""

    def __init__(self, channels: int, momentum: float = 0.1):
        super().__init__(channels, eps=BN_EPS, momentum=momentum, affine=False, track_running_stats=True)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, C, H, W) raw latents -> (B, C, H, W) normalised."""
        if not self.training or not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(z)
        with torch.no_grad():
            zf = z.float()
            stats = torch.cat([zf.sum(dim=(0, 2, 3)), (zf * zf).sum(dim=(0, 2, 3)),
                               torch.tensor([z.numel() / z.shape[1]], device=z.device, dtype=torch.float32)])
            dist.all_reduce(stats)
            c = self.num_features
            n = stats[2 * c]
            mean = stats[:c] / n
            var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype), self.momentum)
        return F.batch_norm(z, mean.to(z.dtype), var.to(z.dtype), None, None, False, 0.0, self.eps)

    @torch.no_grad()
    def init_from_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Running statistics from the VAE's latent statistics (REPA-E's ``init_bn``): mean, std: (C,)."""
        self.running_mean.copy_(mean.reshape(-1))
        self.running_var.copy_(std.reshape(-1) ** 2)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) normalised -> raw latents ``x * sqrt(running_var) + running_mean`` (no eps)."""
        shape = (1, -1, 1, 1)
        return x * self.running_var.sqrt().reshape(shape).to(x.dtype) + self.running_mean.reshape(shape).to(x.dtype)
