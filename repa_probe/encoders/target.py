"""Frozen target encoders for REPA (DINOv2, DINOv1, MoCo v3, CLIP, MAE, I-JEPA, SigLIP and a tiny test ViT).

``load_encoder(name, ...)`` returns a :class:`TargetEncoder`: a frozen, eval-mode wrapper around a timm
ViT that takes uint8 images ``(B, 3, H, W)`` and returns patch tokens ``(B, T, D)`` (after the final norm,
except REPA's CLIP and MAE targets, which use the last block's output; see the registry).

Preprocessing follows REPA (``preprocess_raw_image``): ``x / 255`` -> the encoder's mean/std (ImageNet, CLIP
or SigLIP's) -> bicubic resize (``F.interpolate``, ``align_corners=False``, no antialias) to ``input_size``.
For patch-14 encoders ``input_size = 224 * resolution // 256`` (16x16 tokens at 256 px, 32x32 at 512 px);
patch-16 encoders see the images at their own size. (REPA resizes CLIP before normalising; bicubic weights
sum to one, so the order changes nothing but rounding.)

Weights come from exactly one of (first match wins):
  1. ``weights=`` a ``.pth``/``.pt``/``.tar``/``.safetensors`` file: timm's layout or the official one
     (DINOv2 hub keys, OpenAI CLIP ``visual.*``, MoCo v3 ``module.base_encoder.*``, I-JEPA ``encoder``, MAE);
  2. the torch hub cache, ``<torch.hub.get_dir()>/checkpoints/<hub_file>`` (e.g. ``dinov2_vitb14_pretrain.pth``,
     the file ``torch.hub.load('facebookresearch/dinov2', ...)`` or timm downloads);
  3. the Hugging Face cache for timm's repo (e.g. ``timm/vit_base_patch14_dinov2.lvd142m``; downloaded only
     when the hub is online and reachable).
All end in the same timm architecture; ``pos_embed`` is resampled to the target token grid the way
REPA does it (``timm.layers.resample_abs_pos_embed``, bicubic, timm's default antialias). Random weights
only with ``pretrained=False``; missing weights raise :class:`EncoderWeightsError` naming the config key.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from repa_probe.encoders.registry import (  # noqa: F401 (re-exported)
    ALIASES, ENCODERS, IMAGENET_MEAN, IMAGENET_STD, PREPROCESS_VERSION, EncoderInputError, EncoderSpec,
    default_input_size, list_encoders, register_encoder, resolve_encoder_name)
from repa_probe.encoders.weights import (  # noqa: F401 (re-exported: part of this module's public API)
    EncoderWeightsError, _file_sha256, convert_state_dict, find_pretrained_weights, load_strict, read_state_dict)

log = logging.getLogger(__name__)

def preprocess(images: torch.Tensor, input_size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """REPA's encoder preprocessing.

    images: (B, 3, H, W) uint8 or float in [0, 255]; mean, std: (1, 3, 1, 1) on the same device.
    Returns (B, 3, input_size, input_size) float32: ``((x / 255) - mean) / std``, then bicubic resize
    (``align_corners=False``, no antialias) when H, W differ from ``input_size``.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise EncoderInputError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        x = images.to(torch.float32)
    elif images.is_floating_point():
        lo, hi = torch.aminmax(images)
        if lo < 0 or hi > 255:
            raise EncoderInputError(
                f"float images must lie in [0, 255], got [{lo.item():.3g}, {hi.item():.3g}]")
        x = images.to(torch.float32)
    else:
        raise EncoderInputError(f"images must be uint8 or float in [0, 255], got {images.dtype}")
    x = (x / 255.0 - mean) / std
    if x.shape[-2:] != (input_size, input_size):
        x = F.interpolate(x, size=(input_size, input_size), mode="bicubic", align_corners=False)
    return x


class TargetEncoder(nn.Module):
    """A frozen encoder returning patch tokens.

    Attributes: ``name``, ``embed_dim`` (D), ``patch_size``, ``input_size``, ``grid_size``
    (= input_size // patch_size), ``num_tokens`` (= grid_size**2, T), ``resolution``, ``has_cls``,
    ``source`` (``file:<path>``, ``hub:<path>``, ``hf:<path>`` or ``random``) and ``cache_key``.
    Always in eval mode (``train()`` is a no-op), parameters have ``requires_grad=False`` and every
    forward runs under ``torch.no_grad()`` (outputs are plain tensors, usable as targets in training).
    """

    def __init__(self, backbone: nn.Module, spec: EncoderSpec, input_size: int, resolution: int,
                 source: str, weights_path: Path | None = None):
        super().__init__()
        self.backbone = backbone
        self.name = spec.name
        self.embed_dim = spec.embed_dim
        self.patch_size = spec.patch_size
        self.input_size = input_size
        self.resolution = resolution
        self.grid_size = input_size // spec.patch_size
        self.num_tokens = self.grid_size ** 2
        self.has_cls = spec.has_cls
        self.source = source
        self._weights_path = weights_path
        self._cache_key: str | None = None
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "TargetEncoder":
        """Target encoders stay in eval mode whatever the caller asks."""
        return super().train(False)

    @property
    def cache_key(self) -> str:
        """``name|weights id|res|input size|preprocessing version``; the weights id is a sha256 prefix
        of the weights file, or of the parameters for random init (computed once, lazily)."""
        if self._cache_key is None:
            if self._weights_path is not None:
                weights_id = "sha256:" + _file_sha256(self._weights_path)[:16]
            else:
                h = hashlib.sha256()
                for k, v in self.backbone.state_dict().items():
                    h.update(k.encode())
                    h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
                weights_id = "random:" + h.hexdigest()[:16]
            self._cache_key = (f"{self.name}|{weights_id}|res{self.resolution}|"
                               f"in{self.input_size}|{PREPROCESS_VERSION}")
        return self._cache_key

    def _all_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, P + T, D): final-norm tokens, P = prefix (CLS + registers)."""
        if images.device != self.mean.device:
            raise EncoderInputError(
                f"images are on {images.device} but encoder {self.name} is on {self.mean.device}")
        with torch.no_grad():
            x = preprocess(images, self.input_size, self.mean.float(), self.std.float())
            # the backbone may have been cast (e.g. .to(torch.bfloat16)): feed it its own dtype
            x = x.to(self.backbone.patch_embed.proj.weight.dtype)
            return self.backbone.forward_features(x)

    def features(self, images: torch.Tensor, kind: str = "patch") -> torch.Tensor:
        """``patch``: (B, T, D) patch tokens (no CLS, no registers); ``cls``: (B, D) CLS token (an error for
        encoders without one); ``mean_patch``: (B, D) mean of the patch tokens; ``cls+patch``: (B, 1 + T, D), the
        CLS token in front of the patch tokens (REG's targets)."""
        if kind not in ("patch", "cls", "mean_patch", "cls+patch"):
            raise EncoderInputError(f"kind must be 'patch', 'cls', 'mean_patch' or 'cls+patch', got {kind!r}")
        if kind.startswith("cls") and not self.has_cls:
            raise EncoderInputError(f"encoder {self.name} has no CLS token: use the mean patch token "
                                    "(kind='mean_patch', --target-kind mean_patch)")
        tokens = self._all_tokens(images)
        if kind == "cls":
            return tokens[:, 0]
        patch = tokens[:, self.backbone.num_prefix_tokens:]
        if kind == "cls+patch":
            return torch.cat([tokens[:, :1], patch], dim=1)
        return patch if kind == "patch" else patch.mean(dim=1)

    def forward(self, images: torch.Tensor, kind: str = "patch") -> torch.Tensor:
        """images: (B, 3, H, W) uint8 (or float in [0, 255]) -> (B, T, D) patch tokens (after the final norm
        unless the spec says ``final_norm=False``); another ``kind`` as in :meth:`features`."""
        return self.features(images, kind)

    def cls(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) -> (B, D) CLS token (EncoderInputError when there is none)."""
        return self.features(images, "cls")

    def extra_repr(self) -> str:
        return (f"name={self.name}, input_size={self.input_size}, grid={self.grid_size}, "
                f"dim={self.embed_dim}, source={self.source}")


def build_backbone(spec: EncoderSpec, input_size: int) -> nn.Module:
    """Randomly initialised timm ViT for ``spec`` at ``input_size`` (no classifier head; without the final
    norm when ``spec.final_norm`` is False)."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    if spec.timm_name is None:
        backbone = VisionTransformer(img_size=input_size, patch_size=spec.patch_size, num_classes=0,
                                     **dict(spec.timm_kwargs))
    else:
        backbone = timm.create_model(spec.timm_name, pretrained=False, img_size=input_size, num_classes=0,
                                     **dict(spec.timm_kwargs))
    if not spec.final_norm:
        backbone.norm = nn.Identity()
    return backbone


def load_encoder(name: str, weights: str | os.PathLike | None = None, pretrained: bool = True,
                 resolution: int = 256, source: str = "auto", **kw) -> TargetEncoder:
    """Build a frozen :class:`TargetEncoder`.

    name: a registered name (``dinov2_vitb14``, ``clip_vitl14``, ``siglip_vitb16``, ``tiny_vit``...; see
    ``list_encoders()``) or REPA's spelling (``dinov2-vit-b``, ``clip-vit-L``, ``mae-vit-l``, ``jepa-vit-h``).
    weights: a checkpoint file (official or timm layout); it wins over everything else. pretrained: ``False`` gives random weights (logged as a warning) when no file is given.
    resolution: image side in pixels. source: ``auto`` | ``hub`` | ``timm`` (where to look for pretrained
    weights when no file is given). kw: ``input_size`` overrides the encoder input size.
    """
    spec = resolve_encoder_name(name)
    input_size = kw.pop("input_size", None)
    if kw:
        raise EncoderInputError(f"load_encoder: unexpected keyword(s) {sorted(kw)}")
    if source not in ("auto", "hub", "timm"):
        raise EncoderInputError(f"source must be 'auto', 'hub' or 'timm', got {source!r}")
    input_size = default_input_size(spec, resolution) if input_size is None else int(input_size)
    if input_size <= 0 or input_size % spec.patch_size:
        raise EncoderInputError(f"{spec.name}: input_size {input_size} is not a multiple of {spec.patch_size}")

    if weights is not None:
        path, where = Path(weights).expanduser(), "file"
        if not path.is_file():
            raise EncoderWeightsError(f"encoder.weights={path} does not exist (encoder {spec.name})")
    elif not pretrained:
        path, where = None, "random"
    else:
        path, where = find_pretrained_weights(spec, source)

    if path is None:
        backbone = build_backbone(spec, input_size)
        log.warning("encoder %s: RANDOM weights (encoder.pretrained=false); alignment targets are noise",
                    spec.name)
    else:
        state = read_state_dict(path)
        with torch.device("meta"):  # skip the (slow, wasted) random init: every tensor comes from the file
            backbone = build_backbone(spec, input_size)
        if {n for n, _ in backbone.named_buffers()} - set(backbone.state_dict()):
            backbone = build_backbone(spec, input_size)  # computed buffers (e.g. DINOv3's RoPE) are not in files
        load_strict(backbone, convert_state_dict(state, backbone), path)
        log.info("encoder %s: weights from %s (%s)", spec.name, path, where)
    return TargetEncoder(backbone, spec, input_size, resolution,
                         source=where if path is None else f"{where}:{path}", weights_path=path)
