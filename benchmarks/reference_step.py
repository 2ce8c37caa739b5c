"""The official REPA training step (sihyun-yu/REPA ``train.py``, accelerate removed) for
``benchmarks/train_step.py --reference-repo``: their SiT, SILoss and dataset class imported from a checkout
(never copied here), driven as their loop drives them. See train_step.py's docstring for what is timed."""
from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F


class BenchmarkError(RuntimeError):
    """Bad benchmark arguments or an unusable reference checkout (one-line message)."""


# ----------------------------------------------------------------------------------------------- theirs
def check_reference(repo: Path) -> None:
    """Raise BenchmarkError unless ``repo`` looks like a sihyun-yu/REPA checkout."""
    for f in ("models/sit.py", "loss.py", "dataset.py"):
        if not (repo / f).is_file():
            raise BenchmarkError(f"--reference-repo {repo}: no {f} (expected a checkout of sihyun-yu/REPA)")


def _import_reference(repo: Path):
    """(SiT_models, SILoss, CustomDataset) imported from a sihyun-yu/REPA checkout (never copied here)."""
    check_reference(repo)
    sys.path.insert(0, str(repo))
    try:
        from dataset import CustomDataset
        from loss import SILoss
        from models.sit import SiT_models
    finally:
        sys.path.remove(str(repo))
    return SiT_models, SILoss, CustomDataset


def _their_preprocess_dinov2(x: torch.Tensor) -> torch.Tensor:
    """train.py ``preprocess_raw_image`` for dinov2: /255, ImageNet Normalize, bicubic to 224·(res//256)."""
    resolution = x.shape[-1]
    x = x / 255.0
    mean = torch.tensor([0.485, 0.456, 0.406], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std  # torchvision Normalize does sub_(mean).div_(std)
    return F.interpolate(x, 224 * (resolution // 256), mode="bicubic")


class TheirStep:
    """The official train.py step (accelerate removed); see the module docstring."""

    def __init__(self, repo: Path, a: argparse.Namespace, data_root: Path, backbone: torch.nn.Module,
                 device: torch.device):
        SiT_models, SILoss, CustomDataset = _import_reference(repo)
        if a.model not in SiT_models:
            raise BenchmarkError(f"the official code has no {a.model}; it has {', '.join(SiT_models)}")
        self.device, self.bf16, self.proj_coeff = device, a.bf16 and device.type == "cuda", 0.5
        self.backbone, self.num_prefix = backbone, getattr(backbone, "num_prefix_tokens", 1)
        torch.manual_seed(0)
        kw = dict(input_size=a.resolution // 8, num_classes=1000, use_cfg=True, z_dims=[backbone.embed_dim],
                  encoder_depth=a.encoder_depth, projector_dim=a.projector_dim, fused_attn=True, qk_norm=False)
        self.model = SiT_models[a.model](**kw).to(device)
        self.ema = SiT_models[a.model](**kw).to(device)  # train.py: deepcopy(model); synced by update_ema(decay=0)
        self.ema.requires_grad_(False)
        self._update_ema(decay=0.0)
        self.model.train()
        self.ema.eval()
        self.latents_scale = torch.tensor([0.18215] * 4, device=device).view(1, 4, 1, 1)
        self.latents_bias = torch.zeros(1, 4, 1, 1, device=device)
        self.loss_fn = SILoss(prediction="v", path_type="linear", weighting="uniform", encoders=[backbone],
                              latents_scale=self.latents_scale, latents_bias=self.latents_bias)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0,
                                     eps=1e-8)
        self.dataset = CustomDataset(str(data_root))
        self.loader = torch.utils.data.DataLoader(self.dataset, batch_size=a.batch, shuffle=True,
                                                  num_workers=a.num_workers, pin_memory=device.type == "cuda",
                                                  drop_last=True)
        self._it = (batch for _ in itertools.count() for batch in self.loader)  # epoch after epoch, as train.py

    @torch.no_grad()
    def _update_ema(self, decay: float = 0.9999) -> None:
        """train.py ``update_ema``: per named parameter, ``ema.mul_(decay).add_(param, alpha=1 - decay)``."""
        ema_params = OrderedDict(self.ema.named_parameters())
        for name, param in self.model.named_parameters():
            ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def _forward(self, x, t, y):
        """The model as accelerate prepares it: autocast forward, outputs converted to fp32."""
        with self._autocast():
            out, zs = self.model(x, t, y=y)
        return out.float(), [z.float() for z in zs]

    def __call__(self) -> float:
        raw_image, x, y = next(self._it)
        raw_image, x, y = raw_image.to(self.device), x.squeeze(dim=1).to(self.device), y.to(self.device)
        with torch.no_grad():
            mean, std = torch.chunk(x, 2, dim=1)  # train.py sample_posterior
            x = (mean + std * torch.randn_like(mean)) * self.latents_scale + self.latents_bias
            with self._autocast():
                z = self.backbone.forward_features(_their_preprocess_dinov2(raw_image))
                zs = [z[:, self.num_prefix:]]  # = DINOv2 hub's x_norm_patchtokens
        loss, proj_loss = self.loss_fn(self._forward, x, dict(y=y), zs=zs)
        loss_mean, proj_loss_mean = loss.mean(), proj_loss.mean()
        loss = loss_mean + proj_loss_mean * self.proj_coeff
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self._update_ema()
        for v in (loss_mean, proj_loss_mean, grad_norm):  # train.py logs these with .item() every step
            v.detach().item()
        return loss.item()
