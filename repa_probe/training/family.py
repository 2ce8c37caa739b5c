"""The loss terms of one training step: denoising, REPA, and REG's / HASTE's additions.

* REPA: ``proj_coeff * repa_loss(zs~, [z])``.
* REG (``reg.cls_coeff > 0``, Martinser/REG): the encoder's class token ``c: (b, Dz)`` is noised with the latents'
  t (its own noise, drawn after the labels are dropped), ``c_t = (1 - t) c + t eps_c``; the model gets it as an
  extra token and returns its velocity, scored like the latents' (``cls_coeff`` x flow loss); the REPA targets are
  ``cat([c, patch tokens])`` (:func:`~repa_probe.training.builders.model_inputs` puts the class token first).
* HASTE (``haste.attn_coeff > 0``, NUS-HPC-AI-Lab/HASTE): the attention logits of ``haste.student_blocks`` are
  aligned with those of the encoder's ``haste.teacher_layers`` (:func:`~repa_probe.objectives.attention_loss`);
  from ``haste.stop_step`` on, no alignment term is computed (logged as 0) and the encoder runs only for REG.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from repa_probe.objectives import AttentionTap, attention_loss, repa_loss
from repa_probe.training.config import Config, ConfigError
from repa_probe.training.distributed import DistInfo


@dataclasses.dataclass
class StepBatch:
    """One step's tensors (local rows): ``x_t, x0, noise: (b, C, H, W)``, ``t, y: (b,)``, ``z_enc: (b, [1 +] T, Dz)``
    or None, ``cls_noise: (b, Dz)`` (REG) or None, ``teacher``: per HASTE pair ``(b, H, T, T)`` logits, or None."""

    x_t: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor
    x0: torch.Tensor
    noise: torch.Tensor
    z_enc: Optional[torch.Tensor] = None
    cls_noise: Optional[torch.Tensor] = None
    teacher: Optional[list] = None

    def rows(self, r: slice) -> "StepBatch":
        """The micro-batch ``r`` of every tensor."""
        cut = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return StepBatch(**{k: (None if v is None else [x[r] for x in v] if isinstance(v, list) else v[r])
                            for k, v in cut.items()})


@dataclasses.dataclass
class AttentionTaps:
    """HASTE's hooks: the model's ``student`` blocks and the encoder's ``teacher`` layers (``heads`` teacher heads)."""

    student: AttentionTap
    teacher: AttentionTap
    heads: int


def build_attention_taps(cfg: Config, model, enc) -> Optional[AttentionTaps]:
    """HASTE's taps for ``model`` and the target encoder ``enc`` (None when ``haste.attn_coeff`` is 0); checks the
    block numbers, the token grids and the head counts against the two networks."""
    h = cfg.haste
    if h.attn_coeff == 0:
        return None
    layers = enc.backbone.blocks
    if max(h.student_blocks) > model.depth or max(h.teacher_layers) > len(layers):
        raise ConfigError(f"haste.student_blocks {h.student_blocks} / haste.teacher_layers {h.teacher_layers} go "
                          f"beyond the model's {model.depth} blocks / the encoder's {len(layers)} layers")
    if enc.grid_size != model.grid_size:
        raise ConfigError(f"HASTE aligns attention maps token by token: the encoder's {enc.grid_size}x{enc.grid_size} "
                          f"grid must equal the model's {model.grid_size}x{model.grid_size} (encoder.input_size)")
    heads = layers[0].attn.num_heads
    if heads > model.num_heads:
        raise ConfigError(f"HASTE aligns the first {heads} model heads with the encoder's {heads}: the model has only "
                          f"{model.num_heads} (model.num_heads)")
    student = AttentionTap([model.blocks[b - 1].attn for b in h.student_blocks], model.num_prefix_tokens, "model")
    teacher = AttentionTap([layers[i - 1].attn for i in h.teacher_layers], enc.backbone.num_prefix_tokens, "encoder")
    return AttentionTaps(student, teacher, heads)


def aligning(cfg: Config, step: int) -> bool:
    """Whether the step after ``step`` completed steps computes alignment terms (HASTE's ``global_step < stop``)."""
    return cfg.haste.stop_step is None or step < cfg.haste.stop_step


def class_token_noise(z_enc: torch.Tensor, gen: torch.Generator, dist: DistInfo) -> torch.Tensor:
    """REG's class-token noise ``(b, Dz)``, drawn for the global batch (this rank keeps rows rank::W)."""
    w = dist.world_size
    return torch.randn((z_enc.shape[0] * w, z_enc.shape[-1]), generator=gen, device=z_enc.device)[dist.rank::w]


def model_kwargs(model, objective, b: StepBatch) -> dict:
    """``cls_token=`` (the noisy class token) for a REG model, else nothing."""
    if not model.cls_token_dim:
        return {}
    return {"cls_token": objective.add_noise(b.z_enc[:, 0].float(), b.t, b.cls_noise)}


def extra_terms(cfg: Config, objective, outputs: tuple, b: StepBatch, kwargs: dict,
                taps: Optional[AttentionTaps], align: bool) -> tuple[torch.Tensor, dict]:
    """REPA, REG and HASTE terms of a micro-batch: ``(weighted sum, detached log values)``.

    ``outputs``: the model's ``(out, zs~[, cls_out])``; ``kwargs``: what :func:`model_kwargs` gave the model.
    """
    total, logs = torch.zeros((), device=b.x0.device), {}
    if kwargs:  # REG: the class token's velocity, scored like the latents'
        cls = objective.loss(outputs[2].float(), b.z_enc[:, 0].float(), kwargs["cls_token"], b.cls_noise, b.t)["loss"]
        total = total + cfg.reg.cls_coeff * cls.mean()
        logs["cls"] = cls.detach().mean()
    if cfg.repa.proj_coeff > 0:
        proj, cos = repa_loss(outputs[1], [b.z_enc]) if align else (total.new_zeros(()), total.new_zeros(()))
        total = total + cfg.repa.proj_coeff * proj
        logs.update(repa=proj.detach(), cos=cos.detach())
    if taps is not None:
        attn = attention_loss(taps.student.logits(taps.heads), b.teacher) if align else total.new_zeros(())
        total = total + cfg.haste.attn_coeff * attn
        logs["attn"] = attn.detach()
    return total, logs
