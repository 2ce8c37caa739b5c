"""Registry of target encoders: how each is built (timm name, patch size, width, weight sources) and its input size."""
from __future__ import annotations

from dataclasses import dataclass

from repa_probe.errors import ReproError


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESS_VERSION = "prep-v1"  # bump when preprocessing changes: invalidates on-disk feature caches


class EncoderInputError(ReproError, ValueError):
    """Bad arguments or images passed to a target encoder (one-line message)."""


@dataclass(frozen=True)
class EncoderSpec:
    """How to build one target encoder.

    ``resize_from_256``: input size is ``224 * resolution // 256`` (REPA's rule for patch-14 models);
    otherwise the input size equals the image resolution. ``hub_file``: the official checkpoint file name
    in the torch hub cache; ``hf_repo``: timm's Hugging Face repo id; ``None`` = no pretrained source.
    """

    name: str
    timm_name: str | None
    patch_size: int
    embed_dim: int
    resize_from_256: bool
    hub_file: str | None = None
    hf_repo: str | None = None
    timm_kwargs: tuple = ()


# Registry: CLIP / MoCo v3 / MAE / I-JEPA / SigLIP can be added here later behind the same interface.
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
