"""Named model configurations: ``SiT-{S,B,L,XL}/{1,2,4,8}`` and ``DiT-{S,B,L,XL}/{2,4,8}``.

The name prefix is the architecture: ``SiT-*`` builds SiT as REPA trains it (``time_convention="repa"``: float
time with t=0 data, ``learn_sigma=False``); ``DiT-*`` builds DiT (``time_convention="ddpm"``,
``learn_sigma=True``). An official SiT file is ``SiT-*`` with ``time_convention="sit"`` (t=0 noise). Patch 1 (``SiT-XL/1``, REPA-E's model on 16x16x32 VA-VAE
latents) exists for SiT only, as in REPA-E's ``models/sit.py``. All use
``mlp_ratio`` 4, 1000 classes plus the null class, and no projectors unless ``z_dims`` is given.
"""

from __future__ import annotations

import inspect

from repa_probe.models.transformer import DiffusionTransformer, ModelInputError

MODEL_SIZES: dict[str, dict[str, int]] = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
PATCH_SIZES = (1, 2, 4, 8)
ARCH_PATCH_SIZES = {"SiT": PATCH_SIZES, "DiT": (2, 4, 8)}  # DiT's code registers no patch 1
ARCHITECTURES: dict[str, dict] = {  # name prefix -> constructor defaults
    "SiT": dict(time_convention="repa", learn_sigma=False),
    "DiT": dict(time_convention="ddpm", learn_sigma=True),
}
CONSTRUCTOR_KEYWORDS = tuple(p for p in inspect.signature(DiffusionTransformer.__init__).parameters if p != "self")


def list_models() -> list[str]:
    """All registered names, e.g. ``["DiT-B/2", ..., "SiT-XL/8"]``."""
    return sorted(f"{prefix}-{size}/{p}" for prefix in ARCHITECTURES for size in MODEL_SIZES
                  for p in ARCH_PATCH_SIZES[prefix])


def model_kwargs(name: str) -> dict:
    """Constructor keywords of a registered name (without overrides)."""
    prefix, _, rest = name.partition("-")
    size, _, patch = rest.partition("/")
    patches = {str(p) for p in ARCH_PATCH_SIZES.get(prefix, ())}
    if prefix not in ARCHITECTURES or size not in MODEL_SIZES or patch not in patches:
        raise ModelInputError(f"unknown model name {name!r}; valid names: {', '.join(list_models())}")
    return dict(**MODEL_SIZES[size], patch_size=int(patch), **ARCHITECTURES[prefix])


def create_model(name: str, **overrides) -> DiffusionTransformer:
    """Build a registered model; ``overrides`` may set any constructor keyword.

    Example: ``create_model("SiT-B/2", z_dims=(768,), encoder_depth=4)`` or, for tests,
    ``create_model("DiT-S/2", depth=2, input_size=8)``. Unknown names or keywords raise
    ``ModelInputError`` listing the valid ones.
    """
    kwargs = model_kwargs(name)
    unknown = sorted(set(overrides) - set(CONSTRUCTOR_KEYWORDS))
    if unknown:
        raise ModelInputError(f"unknown model keyword(s) {unknown}; valid: {', '.join(CONSTRUCTOR_KEYWORDS)}")
    kwargs.update(overrides)
    return DiffusionTransformer(**kwargs)


def size_name(config: dict) -> str | None:
    """``"S" | "B" | "L" | "XL"`` when (depth, hidden_size, num_heads) match a registered size, else None."""
    for size, spec in MODEL_SIZES.items():
        if all(config.get(k) == v for k, v in spec.items()):
            return size
    return None


def model_name(config: dict) -> str | None:
    """Registered-style name (``"SiT-XL/2"``; the ``sit`` and ``repa`` conventions both map to ``SiT``) or None."""
    size = size_name(config)
    if size is None or config.get("patch_size") not in PATCH_SIZES:
        return None
    prefix = "DiT" if config.get("time_convention") == "ddpm" else "SiT"
    return f"{prefix}-{size}/{config['patch_size']}"
