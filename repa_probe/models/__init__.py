"""SiT / DiT diffusion transformers (one architecture; three time conventions: repa, sit, ddpm)."""

from repa_probe.models.registry import MODEL_SIZES, create_model, list_models, model_kwargs, model_name, size_name
from repa_probe.models.transformer import (
    TIME_CONVENTIONS,
    DiffusionTransformer,
    ModelInputError,
    sincos_pos_embed_2d,
    timestep_embedding,
)

__all__ = [
    "DiffusionTransformer", "ModelInputError", "TIME_CONVENTIONS", "MODEL_SIZES",
    "create_model", "list_models", "model_kwargs", "model_name", "size_name",
    "sincos_pos_embed_2d", "timestep_embedding",
]
