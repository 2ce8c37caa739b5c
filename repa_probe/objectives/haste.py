"""HASTE's attention-map alignment (NUS-HPC-AI-Lab/HASTE ``loss.py``): read attention logits, compare them.

HASTE aligns the attention maps of chosen diffusion-transformer blocks (SiT-XL/2 blocks 5-8) with those of chosen
encoder layers (DINOv2-B layers 9-12) by a cross-entropy between the row-wise softmaxes, besides REPA's feature
loss, and switches every alignment term off at a fixed step (``haste.stop_step``; the trainer's job).

Attention logits are ``(q * d^-1/2) k^T`` per head, ``(B, H, N, N)``, with q and k after the optional qk-norm, as
their attention modules compute them; :class:`AttentionTap` reads q and k with forward hooks on each attention
module's ``q_norm`` / ``k_norm`` (an ``nn.Identity`` without qk-norm), so nothing is recomputed. Our attention
blocks and timm's ViT attention both have these modules.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from repa_probe.objectives._common import ObjectiveError


class AttentionTap:
    """Forward hooks that keep the latest q and k of each of ``attentions`` (modules with ``q_norm``, ``k_norm``).

    ``prefix``: leading tokens (CLS, registers) dropped from both axes of the logits (HASTE keeps the encoder's
    patch tokens only). The hooks stay until :meth:`remove`; they are registered once, before any compilation.
    """

    def __init__(self, attentions: Sequence[nn.Module], prefix: int = 0, what: str = "model"):
        missing = [i for i, a in enumerate(attentions) if not (hasattr(a, "q_norm") and hasattr(a, "k_norm"))]
        if missing:
            raise ObjectiveError(f"HASTE attention alignment: the {what}'s attention modules {missing} have no "
                                 "q_norm / k_norm to read queries and keys from (a timm-style ViT attention is needed)")
        self.prefix = int(prefix)
        self.q: list = [None] * len(attentions)
        self.k: list = [None] * len(attentions)
        self._handles = []
        for i, attn in enumerate(attentions):
            self._handles.append(attn.q_norm.register_forward_hook(self._keeper(self.q, i)))
            self._handles.append(attn.k_norm.register_forward_hook(self._keeper(self.k, i)))

    @staticmethod
    def _keeper(store: list, i: int):
        def hook(module, inputs, output):
            store[i] = output
        return hook

    def logits(self, heads: int | None = None) -> list[torch.Tensor]:
        """Per tapped module ``(B, h, N - prefix, N - prefix)`` logits of the first ``heads`` heads (all: None),
        from the last forward pass."""
        if any(q is None for q in self.q):
            raise ObjectiveError("HASTE attention alignment: no attention was recorded (the tapped modules did "
                                 "not run)")
        p = self.prefix
        out = []
        for q, k in zip(self.q, self.k):
            q, k = q[:, :heads, p:], k[:, :heads, p:]
            out.append((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1))
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def attention_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """HASTE's attention loss: ``mean_pairs mean_rows -sum_j softmax(teacher)_j log softmax(student)_j`` (float32).

    Args:
        student: per aligned pair ``(B, H_s, N, N)`` logits of the diffusion transformer (gradients flow).
        teacher: per pair ``(B, H_t, N, N)`` encoder logits, ``H_t <= H_s``: the first ``H_t`` student heads are
            aligned head by head (HASTE: the first 12 of SiT-XL's 16 heads with DINOv2-B's 12).
    Returns:
        a float32 scalar (the mean over pairs of the mean over batch, heads and query rows).
    """
    student, teacher = list(student), list(teacher)
    if len(student) != len(teacher) or not student:
        raise ObjectiveError(f"HASTE attention loss needs as many model blocks as encoder layers (>= 1), got "
                             f"{len(student)} and {len(teacher)}: set haste.student_blocks and haste.teacher_layers")
    per_pair = []
    for i, (s, t) in enumerate(zip(student, teacher)):
        h = t.shape[1]
        if s.ndim != 4 or t.ndim != 4 or s.shape[0] != t.shape[0] or s.shape[2:] != t.shape[2:] or s.shape[1] < h:
            raise ObjectiveError(f"HASTE attention pair {i}: model logits {tuple(s.shape)} and encoder logits "
                                 f"{tuple(t.shape)} do not fit (same batch and tokens, at least as many model heads): "
                                 "the model's token grid must equal the encoder's")
        target = t.float().softmax(dim=-1)
        per_pair.append(-(target * s[:, :h].float().log_softmax(dim=-1)).sum(dim=-1).mean())
    return torch.stack(per_pair).mean()
