"""Named model configurations: ``SiT-{S,B,L,XL}/{1,2,4,8}``, ``DiT-{S,B,L,XL}/{2,4,8}`` and
``LightningDiT-{S,B,L,XL}/{1,2,4,8}`` (patch 1: REPA-E's SiT-XL/1 and LightningDiT's XL/1 on 16x16x32 VA-VAE
latents; DiT's code has none).

The name prefix is the architecture: ``SiT-*`` builds SiT as REPA trains it (``time_convention="repa"``: float
time with t=0 data, ``learn_sigma=False``); ``DiT-*`` builds DiT (``time_convention="ddpm"``,
``learn_sigma=True``); ``LightningDiT-*`` builds :class:`~repa_probe.models.lightningdit.LightningDiT` with the
switches of their released XL/1 (SwiGLU, RMSNorm, RoPE) in REPA time. An official SiT file is ``SiT-*`` with
``time_convention="sit"`` (t=0 noise), an official LightningDiT file ``LightningDiT-*`` with it. All use
``mlp_ratio`` 4, 1000 classes plus the null class, and no projectors unless ``z_dims`` is given.
:func:`from_config` builds the right class from constructor keywords (``model.config``).
"""

from __future__ import annotations


import dataclasses

from repa_probe.models.lightningdit import OPTION_NAMES as LIGHTNING_OPTIONS
from repa_probe.models.lightningdit import LightningDiT, LightningOptions
from repa_probe.models.transformer import DiffusionTransformer, ModelInputError, TransformerConfig

MODEL_SIZES: dict[str, dict[str, int]] = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
PATCH_SIZES = (2, 4, 8)
ARCHITECTURES: dict[str, dict] = {  # name prefix -> constructor defaults
    "SiT": dict(time_convention="repa", learn_sigma=False),
    "DiT": dict(time_convention="ddpm", learn_sigma=True),
    "LightningDiT": dict(time_convention="repa", learn_sigma=False, **dataclasses.asdict(LightningOptions())),
}
ARCHITECTURE_PATCHES = {"SiT": (1,), "LightningDiT": (1,)}  # beyond PATCH_SIZES (REPA-E's and their XL/1)
CONSTRUCTOR_KEYWORDS = tuple(f.name for f in dataclasses.fields(TransformerConfig))


def _patches(prefix: str) -> tuple[int, ...]:
    return tuple(sorted({*PATCH_SIZES, *ARCHITECTURE_PATCHES.get(prefix, ())}))


def model_class(config: dict) -> type[DiffusionTransformer]:
    """:class:`LightningDiT` when ``config`` (constructor keywords) names any of its switches, else
    :class:`DiffusionTransformer`."""
    return LightningDiT if any(k in config for k in LIGHTNING_OPTIONS) else DiffusionTransformer


def from_config(config: dict) -> DiffusionTransformer:
    """The model of constructor keywords ``config`` (``model.config`` of any model here, or a layout's)."""
    return model_class(config)(**config)


def list_models() -> list[str]:
    """All registered names, e.g. ``["DiT-B/2", ..., "SiT-XL/8"]``."""
    return sorted(f"{prefix}-{size}/{p}" for prefix in ARCHITECTURES for size in MODEL_SIZES for p in _patches(prefix))


def model_kwargs(name: str) -> dict:
    """Constructor keywords of a registered name (without overrides)."""
    prefix, _, rest = name.partition("-")
    size, _, patch = rest.partition("/")
    if prefix not in ARCHITECTURES or size not in MODEL_SIZES or patch not in {str(p) for p in _patches(prefix)}:
        raise ModelInputError(f"unknown model name {name!r}; valid names: {', '.join(list_models())}")
    return dict(**MODEL_SIZES[size], patch_size=int(patch), **ARCHITECTURES[prefix])


def create_model(name: str, **overrides) -> DiffusionTransformer:
    """Build a registered model; ``overrides`` may set any constructor keyword.

    Example: ``create_model("SiT-B/2", z_dims=(768,), encoder_depth=4)`` or, for tests,
    ``create_model("DiT-S/2", depth=2, input_size=8)``. Unknown names or keywords raise
    ``ModelInputError`` listing the valid ones.
    """
    kwargs = model_kwargs(name)
    valid = CONSTRUCTOR_KEYWORDS + (LIGHTNING_OPTIONS if model_class(kwargs) is LightningDiT else ())
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ModelInputError(f"unknown model keyword(s) {unknown} for {name}; valid: {', '.join(valid)}")
    kwargs.update(overrides)
    return from_config(kwargs)


def size_name(config: dict) -> str | None:
    """``"S" | "B" | "L" | "XL"`` when (depth, hidden_size, num_heads) match a registered size, else None."""
    for size, spec in MODEL_SIZES.items():
        if all(config.get(k) == v for k, v in spec.items()):
            return size
    return None


def model_name(config: dict) -> str | None:
    """Registered-style name (``"SiT-XL/2"``; the ``sit`` and ``repa`` conventions both map to ``SiT``;
    ``"LightningDiT-XL/1"``) or None."""
    size = size_name(config)
    prefix = "LightningDiT" if model_class(config) is LightningDiT else (
        "DiT" if config.get("time_convention") == "ddpm" else "SiT")
    if size is None or config.get("patch_size") not in _patches(prefix):
        return None
    return f"{prefix}-{size}/{config['patch_size']}"
