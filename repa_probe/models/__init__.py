"""SiT / DiT diffusion transformers (one architecture; three time conventions: repa, sit, ddpm) and LightningDiT's
block switches (:mod:`repa_probe.models.lightningdit`)."""

from repa_probe.models.lightningdit import LightningDiT
from repa_probe.models.registry import (MODEL_SIZES, create_model, from_config, list_models, model_kwargs, model_name,
                                        size_name)
from repa_probe.models.transformer import (
    TIME_CONVENTIONS,
    DiffusionTransformer,
    ModelInputError,
    TransformerConfig,
    sincos_pos_embed_2d,
    timestep_embedding,
)

__all__ = [
    "DiffusionTransformer", "TransformerConfig", "LightningDiT", "ModelInputError", "TIME_CONVENTIONS", "MODEL_SIZES",
    "create_model", "from_config", "list_models", "model_kwargs", "model_name", "size_name",
    "sincos_pos_embed_2d", "timestep_embedding",
]
