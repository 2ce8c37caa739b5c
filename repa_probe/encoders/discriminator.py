"""The PatchGAN discriminator REPA-E trains against its VAE (taming-transformers' ``NLayerDiscriminator``).

``PatchDiscriminator(ndf=64, n_layers=3)``: ``Conv(3, ndf, 4, s2) → LeakyReLU(0.2)``, then ``n_layers - 1``
``Conv(4, s2, no bias) → BatchNorm → LeakyReLU`` with widths ``ndf · min(2^n, 8)``, one more stride-1 block, and a
stride-1 ``Conv(·, 1, 4)`` to a map of logits. Keys ``main.{0,2,3,5,6,8,9,11}.*`` as REPA-E's
``loss/discriminator.py`` (its ``-discriminator-ckpt.pt`` loads strictly). Init: convolution weights N(0, 0.02),
BatchNorm weights N(1, 0.02) and biases 0 (taming's ``weights_init``); the first and last convolutions keep
PyTorch's default bias init. Inputs of at least 32 px (two stride-1 4x4 convolutions at the end).
"""
from __future__ import annotations

import torch
import torch.nn as nn


class PatchDiscriminator(nn.Module):
    """images ``(B, 3, H, W)`` in [-1, 1] -> logits ``(B, 1, h, w)`` (h ≈ H / 2^n_layers - 2)."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False), nn.BatchNorm2d(ndf * mult),
                       nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``0.5 (mean relu(1 - D(x)) + mean relu(1 + D(x̂)))``, a scalar."""
    return 0.5 * (torch.relu(1.0 - logits_real).mean() + torch.relu(1.0 + logits_fake).mean())
