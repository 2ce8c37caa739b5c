"""Frozen encoders: the REPA target encoders (DINOv2, DINOv1, MoCo v3, CLIP, MAE, I-JEPA, SigLIP, a tiny test ViT),
their weights, and the SD-VAE."""
from repa_probe.encoders.registry import EncoderInputError, EncoderSpec, list_encoders, register_encoder
from repa_probe.encoders.target import TargetEncoder, load_encoder
from repa_probe.encoders.vae import LatentVAE, load_vae
from repa_probe.encoders.weights import EncoderWeightsError

__all__ = ["EncoderInputError", "EncoderSpec", "EncoderWeightsError", "LatentVAE", "TargetEncoder", "list_encoders",
           "load_encoder", "load_vae", "register_encoder"]
