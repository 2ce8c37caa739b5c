"""REG models in the analyses: the clean class tokens their blocks take as an extra input.

A REG model (``cls_token_dim > 0``, Martinser/REG) was trained with its target encoder's CLS token as one more
token, noised with the image's t; its blocks cannot run without it. The analyses feed it the same thing: the CLS
token of the image from the REG run's own training encoder (rebuilt from its config; REG runs in one analysis must
agree on it), or, for official REG files (which store no encoder), the analysis target encoder (``--encoder``;
REG trains with DINOv2-B). :func:`repa_probe.analysis.core.features.extract_features` noises it per timestep.
"""
from __future__ import annotations

import logging
from typing import Sequence

from repa_probe.analysis.core.features import ModelInputs
from repa_probe.analysis.core.inputs import AnalysisInputError, agreed, build_config_encoder, encoder_fields
from repa_probe.analysis.core.targets import encoder_features

log = logging.getLogger("repa_probe")


def reg_entries(entries: Sequence) -> list:
    """The checkpoints among ``entries`` whose model has REG's class token."""
    return [e for e in entries if e.info.config.get("cls_token_dim", 0)]


def class_token_encoder(entries: Sequence, target_encoder=None):
    """The encoder whose CLS token the REG models among ``entries`` take (None without REG models); its width must
    be their ``cls_token_dim``."""
    reg = reg_entries(entries)
    if not reg:
        return None
    ours = [e for e in reg if e.cfg is not None]
    if ours:
        agreed(ours, "encoder (REG class token)", encoder_fields)
        encoder = build_config_encoder(ours[0].cfg)
    elif target_encoder is None:
        raise AnalysisInputError(f"{reg[0].label}: an official REG checkpoint stores no encoder, and its blocks need "
                                 "the encoder's class token: pass --encoder NAME (REG trains with dinov2_vitb14)")
    else:
        encoder = target_encoder
    widths = sorted({e.info.config["cls_token_dim"] for e in reg})
    if widths != [encoder.embed_dim]:
        raise AnalysisInputError(f"REG checkpoints take class tokens of width {widths}, but the encoder {encoder.name} "
                                 f"gives {encoder.embed_dim}")
    return encoder


def attach_class_tokens(inputs: ModelInputs, dataset, encoder, options, device) -> None:
    """Set ``inputs.cls`` to the ``(N, D_c)`` CLS tokens of ``dataset`` under ``encoder`` (no-op when None)."""
    if encoder is None:
        return
    log.info("REG class tokens: CLS of %s", encoder.name)
    inputs.cls = encoder_features(encoder.to(device), dataset, "cls", cache_dir=options.cache_dir,
                                  batch_size=options.batch_size, progress=options.progress)
