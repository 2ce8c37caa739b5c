"""Registry of target encoders: how each is built (timm name, patch size, width, weight sources), its input size
and normalisation, and REPA's / iREPA's ``--enc-type`` spellings as aliases.

Per-encoder choices follow the official REPA code (``preprocess_raw_image`` and ``load_encoders``); the
docs/encoders.md lists them in a table with their weight sources.
"""
from __future__ import annotations

from dataclasses import dataclass

from repa_probe.errors import ReproError


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)  # SigLIP's own normalisation (x / 127.5 - 1)
PREPROCESS_VERSION = "prep-v1"  # bump when preprocessing changes: invalidates on-disk feature caches


class EncoderInputError(ReproError, ValueError):
    """Bad arguments or images passed to a target encoder (one-line message)."""


@dataclass(frozen=True)
class EncoderSpec:
    """How to build one target encoder.

    ``resize_from_256``: input size is ``224 * resolution // 256`` (REPA's rule for patch-14 models);
    otherwise the input size equals the image resolution. ``hub_file``: the official checkpoint file name
    in the torch hub cache (``<torch.hub.get_dir()>/checkpoints/``); ``hf_repo``: timm's Hugging Face repo id;
    ``None`` = no such source. ``mean``/``std``: the encoder's own input normalisation. ``final_norm``: the
    tokens are taken after the backbone's final LayerNorm (False for REPA's CLIP and MAE targets, which use
    the last block's output). ``has_cls``: the backbone has a CLS token (I-JEPA and SigLIP do not).
    """

    name: str
    timm_name: str | None
    patch_size: int
    embed_dim: int
    resize_from_256: bool
    hub_file: str | None = None
    hf_repo: str | None = None
    timm_kwargs: tuple = ()
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    final_norm: bool = True
    has_cls: bool = True


ENCODERS: dict[str, EncoderSpec] = {}
ALIASES: dict[str, str] = {}


def register_encoder(spec: EncoderSpec, aliases: tuple[str, ...] = ()) -> None:
    """Add ``spec`` (and optional alternative spellings) to the registry."""
    ENCODERS[spec.name] = spec
    for alias in aliases:
        ALIASES[alias] = spec.name


_DINOV2 = {"s": ("small", 384), "b": ("base", 768), "l": ("large", 1024), "g": ("giant", 1536)}
for _size, (_timm_size, _dim) in _DINOV2.items():
    for _reg in (False, True):
        _name = f"dinov2_vit{_size}14" + ("_reg" if _reg else "")
        _timm = f"vit_{_timm_size}_patch14_" + ("reg4_" if _reg else "") + "dinov2"
        _hub = f"dinov2_vit{_size}14" + ("_reg4" if _reg else "") + "_pretrain.pth"
        register_encoder(
            EncoderSpec(_name, _timm, 14, _dim, True, hub_file=_hub, hf_repo=f"timm/{_timm}.lvd142m"),
            aliases=(f"dinov2-vit-{_size}" + ("-reg" if _reg else ""),),  # REPA's --enc-type spelling
        )

# DINOv3 (timm's RoPE ViT, CLS + 4 registers): final-norm tokens, ImageNet stats, no resize (patch 16), as iREPA.
for _size, (_timm_size, _dim) in {"s": ("small", 384), "b": ("base", 768), "l": ("large", 1024)}.items():
    _timm = f"vit_{_timm_size}_patch16_dinov3"
    register_encoder(EncoderSpec(f"dinov3_vit{_size}16", _timm, 16, _dim, False, hf_repo=f"timm/{_timm}.lvd1689m"),
                     aliases=(f"dinov3-vit-{_size}",))
# DINO (v1): final-norm tokens (DINO's get_intermediate_layers), ImageNet stats, no resize (patch 16).
for _size, (_timm_size, _dim, _file) in {"s": ("small", 384, "deitsmall16"), "b": ("base", 768, "vitbase16")}.items():
    register_encoder(EncoderSpec(
        f"dinov1_vit{_size}16", f"vit_{_timm_size}_patch16_224", 16, _dim, False,
        hub_file=f"dino_{_file}_pretrain.pth", hf_repo=f"timm/vit_{_timm_size}_patch16_224.dino"),
        aliases=(f"dinov1-vit-{_size}",))
# MoCo v3: timm forward_features (final norm), ImageNet stats, no resize. Weights only from a local file
# (REPA's ckpts/mocov3_vit{s,b,l}.pth, or the official vit-{s,b}-300ep.pth.tar; base_encoder is used).
for _size, (_timm_size, _dim, _kw) in {"s": ("small", 384, (("num_heads", 12),)), "b": ("base", 768, ()),
                                       "l": ("large", 1024, ())}.items():
    register_encoder(EncoderSpec(
        f"mocov3_vit{_size}16", f"vit_{_timm_size}_patch16_224", 16, _dim, False,
        hub_file=f"mocov3_vit{_size}.pth", timm_kwargs=_kw), aliases=(f"mocov3-vit-{_size}",))
# CLIP ViT-L/14 (OpenAI, QuickGELU): REPA takes the transformer output without ln_post, CLS dropped; CLIP stats.
register_encoder(EncoderSpec(
    "clip_vitl14", "vit_large_patch14_clip_quickgelu_224", 14, 1024, True,
    hf_repo="timm/vit_large_patch14_clip_224.openai", mean=CLIP_MEAN, std=CLIP_STD, final_norm=False),
    aliases=("clip-vit-L", "clip-vit-l"))
# MAE ViT-L/16: REPA takes the last block's output (no final norm), ImageNet stats, no resize.
register_encoder(EncoderSpec(
    "mae_vitl16", "vit_large_patch16_224", 16, 1024, False, hub_file="mae_pretrain_vit_large.pth",
    hf_repo="timm/vit_large_patch16_224.mae", final_norm=False), aliases=("mae-vit-l",))
# I-JEPA ViT-H/14 (no CLS): final-norm tokens, ImageNet stats, resized to 224 (timm downloads the official file
# into the torch hub cache; there is no HF copy).
register_encoder(EncoderSpec(
    "ijepa_vith14", "vit_huge_patch14_gap_224", 14, 1280, True, hub_file="IN1K-vit.h.14-300e.pth.tar",
    has_cls=False), aliases=("jepa-vit-h", "ijepa-vit-h"))
# SigLIP / SigLIP 2 at 256 px (no CLS; the attention-pool head is dropped): final-norm tokens, SigLIP's own
# (0.5, 0.5) normalisation (iREPA fed ImageNet-normalised pixels: see docs/encoders.md), no resize (patch 16).
for _v, _tag in (("", "webli"), ("2", "v2_webli")):
    for _size, (_timm_size, _dim) in {"b": ("base", 768), "l": ("large", 1024)}.items():
        _timm = f"vit_{_timm_size}_patch16_siglip_256"
        register_encoder(EncoderSpec(
            f"siglip{_v}_vit{_size}16", _timm, 16, _dim, False, hf_repo=f"timm/{_timm}.{_tag}",
            timm_kwargs=(("global_pool", ""),), mean=HALF, std=HALF, has_cls=False),
            aliases=(f"siglip{_v}-vit-{_size}",))
register_encoder(EncoderSpec(
    "tiny_vit", None, 4, 64, False, timm_kwargs=(("embed_dim", 64), ("depth", 2), ("num_heads", 2))))


def list_encoders() -> list[str]:
    """Registered encoder names (aliases excluded)."""
    return sorted(ENCODERS)


def resolve_encoder_name(name: str) -> EncoderSpec:
    """Spec for ``name`` or an alias such as REPA's ``dinov2-vit-b``."""
    spec = ENCODERS.get(ALIASES.get(name, name))
    if spec is None:
        raise EncoderInputError(f"unknown encoder {name!r}; known: {', '.join(list_encoders())}")
    return spec


def default_input_size(spec: EncoderSpec, resolution: int) -> int:
    """Encoder input size for images of side ``resolution`` (REPA: 224 * res // 256 for patch 14)."""
    size = 224 * resolution // 256 if spec.resize_from_256 else resolution
    if size <= 0 or size % spec.patch_size:
        raise EncoderInputError(
            f"{spec.name}: input size {size} (from resolution {resolution}) is not a positive multiple of "
            f"patch size {spec.patch_size}; pass input_size= explicitly")
    return size
