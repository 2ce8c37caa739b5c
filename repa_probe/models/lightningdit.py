"""LightningDiT (hustvl/LightningDiT): the SiT / DiT transformer with a modernised block, official key names.

:class:`LightningDiT` is :class:`~repa_probe.models.transformer.DiffusionTransformer` with four switches, named
as in their ``LightningDiT.__init__`` without the ``use_`` prefix (their released XL/1: ``swiglu``, ``rmsnorm``
and ``rope`` on, ``qk_norm`` and ``wo_shift`` off):

* ``swiglu`` -- the MLP is SwiGLU, ``w3(silu(a) * b)`` with ``a, b = w12(x).chunk(2)``; hidden width
  ``int(2/3 * int(D * mlp_ratio))`` (3072 for XL); keys ``mlp.w12``, ``mlp.w3``.
* ``rmsnorm`` -- :class:`RMSNorm` (eps 1e-6, learned ``weight``) replaces the affine-free LayerNorms ``norm1``,
  ``norm2`` and ``final_layer.norm_final``, and the q/k norms when ``qk_norm`` is on (over head_dim; without
  ``rmsnorm`` they are LayerNorms, as REPA's).
* ``rope`` -- 2-D axial rotary embedding of queries and keys after their norm (:class:`AxialRoPE`), buffers
  ``feat_rope.freqs_cos`` / ``feat_rope.freqs_sin`` ``(T, head_dim)`` in the state dict. The fixed sin-cos
  ``pos_embed`` is still added to the tokens, as in their code.
* ``wo_shift`` -- adaLN without shifts: ``adaLN_modulation`` gives 4D outputs (scale, gate; attention then MLP).

Time: their released models run SiT's time (t = 0 noise, ``time_convention="sit"``); models trained here run
REPA time like every other SiT of this project. :func:`read_layout` reads the switches, the MLP ratio and the
head width back from a state dict (used by :mod:`repa_probe.models.layout`).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from repa_probe.models.layers import Attention, Mlp, ModelInputError
from repa_probe.models.transformer import DiffusionTransformer

ROPE_THETA = 10000.0
RMS_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class LightningOptions:
    """The block switches of :class:`LightningDiT` (see the module docstring)."""

    swiglu: bool = True
    rmsnorm: bool = True
    rope: bool = True
    wo_shift: bool = False


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(LightningOptions))


def swiglu_hidden(dim: int, mlp_ratio: float) -> int:
    """SwiGLU hidden width: two thirds of the plain MLP's, ``int(2/3 * int(dim * mlp_ratio))``."""
    return int(2 / 3 * int(dim * mlp_ratio))


class RMSNorm(nn.Module):
    """``x * rsqrt(mean(x², -1) + eps) * weight``, normalised in float32 and cast back. ``(..., D) -> (..., D)``."""

    def __init__(self, dim: int, eps: float = RMS_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class SwiGLU(nn.Module):
    """``(B, T, D) -> (B, T, D)``: ``w3(silu(a) * b)`` with ``a, b = w12(x).chunk(2, -1)`` (biases on)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class AxialRoPE(nn.Module):
    """2-D axial rotary position embedding on a ``grid x grid`` token raster (EVA-02's fast variant).

    Each half of head_dim gets ``head_dim / 4`` frequencies ``theta^(-2i / (head_dim / 2))``, each used by one
    interleaved pair of channels; the first half turns with the token's row, the second with its column.
    Positions are ``arange(g) / g * g`` as theirs (float32). Buffers ``freqs_cos``, ``freqs_sin``: ``(T, head_dim)``.
    """

    def __init__(self, head_dim: int, grid: int, theta: float = ROPE_THETA):
        super().__init__()
        if head_dim % 4:
            raise ModelInputError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
        half = head_dim // 2
        freqs = 1.0 / (theta ** (torch.arange(0, half, 2)[: half // 2].float() / half))
        pos = torch.arange(grid) / grid * grid
        angles = torch.outer(pos, freqs).repeat_interleave(2, dim=-1)  # (g, half)
        rows = angles[:, None, :].expand(grid, grid, half)
        cols = angles[None, :, :].expand(grid, grid, half)
        table = torch.cat([rows, cols], dim=-1).reshape(grid * grid, head_dim)
        self.register_buffer("freqs_cos", table.cos())
        self.register_buffer("freqs_sin", table.sin())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate ``x: (B, heads, T, head_dim)``: ``x cos + rot(x) sin`` with ``rot(x)`` mapping each pair
        ``(x1, x2)`` to ``(-x2, x1)``."""
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
        rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
        return (x * self.freqs_cos + rotated * self.freqs_sin).to(x.dtype)


class LightningAttention(Attention):
    """:class:`~repa_probe.models.layers.Attention` with RMSNorm q/k norms (``rmsnorm``) and RoPE.

    The RoPE module is the model's ``feat_rope`` (set with :meth:`use_rope`), held outside the submodules so
    that its buffers appear once in the state dict, under ``feat_rope.*`` as in theirs.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, rmsnorm: bool):
        super().__init__(dim, num_heads, qk_norm=qk_norm and not rmsnorm)
        if qk_norm and rmsnorm:
            self.q_norm = RMSNorm(self.head_dim)
            self.k_norm = RMSNorm(self.head_dim)
        self._rope: tuple = ()

    def use_rope(self, rope: AxialRoPE) -> None:
        self._rope = (rope,)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x: (B, T, D)`` -> q, k, v ``(B, heads, T, head_dim)``: normed, then q and k rotated."""
        q, k, v = super().qkv_heads(x)
        if self._rope:
            q, k = self._rope[0](q), self._rope[0](k)
        return q, k, v


def _modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """``x: (B, T, D) * (1 + scale) (+ shift)``, ``shift, scale: (B, D)``; no shift with ``wo_shift``."""
    x = x * (1 + scale.unsqueeze(1))
    return x if shift is None else x + shift.unsqueeze(1)


def _norm(dim: int, rmsnorm: bool) -> nn.Module:
    return RMSNorm(dim) if rmsnorm else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class LightningBlock(nn.Module):
    """LightningDiT's adaLN-Zero block. ``x: (B, T, D)``, ``c: (B, D)`` -> ``(B, T, D)``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: bool, options: LightningOptions):
        super().__init__()
        self.norm1 = _norm(dim, options.rmsnorm)
        self.attn = LightningAttention(dim, num_heads, qk_norm, options.rmsnorm)
        self.norm2 = _norm(dim, options.rmsnorm)
        hidden = int(dim * mlp_ratio)
        self.mlp = SwiGLU(dim, swiglu_hidden(dim, mlp_ratio)) if options.swiglu else Mlp(dim, hidden)
        self.wo_shift = options.wo_shift
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, (4 if options.wo_shift else 6) * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.wo_shift:
            scale_a, gate_a, scale_m, gate_m = self.adaLN_modulation(c).chunk(4, dim=-1)
            shift_a = shift_m = None
        else:
            shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_a.unsqueeze(1) * self.attn(_modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), shift_m, scale_m))


class LightningDiT(DiffusionTransformer):
    """DiT / SiT with LightningDiT's block switches (keyword-only; the rest as
    :class:`~repa_probe.models.transformer.DiffusionTransformer`, REPA projectors included).

    ``config`` holds the switches too, so ``LightningDiT(**model.config)`` rebuilds the model.
    """

    def __init__(self, *, swiglu: bool = True, rmsnorm: bool = True, rope: bool = True, wo_shift: bool = False,
                 **kwargs):
        # read by _make_block / _make_final_layer while DiffusionTransformer.__init__ builds the layers
        object.__setattr__(self, "options", LightningOptions(bool(swiglu), bool(rmsnorm), bool(rope), bool(wo_shift)))
        super().__init__(**kwargs)
        self._config.update(dataclasses.asdict(self.options))
        self.feat_rope = AxialRoPE(self.hidden_size // self.num_heads, self.grid_size) if rope else None
        for block in self.blocks:
            if rope:
                block.attn.use_rope(self.feat_rope)

    def _make_block(self) -> nn.Module:
        c = self._config
        if self.options.rope and c.get("cls_token_dim"):
            raise ModelInputError("invalid LightningDiT config: RoPE has a table for the patch tokens only; "
                                  "REG's class token (cls_token_dim) needs rope off")
        if self.options.rope and (c["hidden_size"] // c["num_heads"]) % 4:
            raise ModelInputError(f"invalid LightningDiT config: rope needs head_dim = hidden_size / num_heads "
                                  f"divisible by 4, got {c['hidden_size']} / {c['num_heads']}")
        return LightningBlock(c["hidden_size"], c["num_heads"], c["mlp_ratio"], c["qk_norm"], self.options)

    def _make_final_layer(self) -> nn.Module:
        layer = super()._make_final_layer()
        if self.options.rmsnorm:
            layer.norm_final = RMSNorm(self.hidden_size)
        return layer

    @property
    def family(self) -> str:
        return "LightningDiT"


def _mlp_ratio_of(hidden: int, width: int) -> float:
    """The ``mlp_ratio`` whose SwiGLU width (:func:`swiglu_hidden`) is ``width``: the simplest one (multiples of
    1/8 first; 4.0 for every official size), else the exact quotient of the plain MLP width."""
    candidates = [k / 8 for k in range(1, 129)] + [p / hidden for p in range(int(1.5 * width) - 2, int(1.5 * width) + 4)]
    for ratio in candidates:
        if swiglu_hidden(hidden, ratio) == width:
            return ratio
    raise ModelInputError(f"mlp.w12 width {2 * width} fits no mlp_ratio for hidden size {hidden}")


def read_layout(sd: Mapping[str, torch.Tensor], hidden: int) -> dict:
    """LightningDiT keywords a normalised state dict reveals: ``{}`` for a DiT / SiT / REPA layout, else the four
    switches, ``mlp_ratio`` (from ``mlp.w12`` when ``swiglu``) and ``head_dim`` (from the RoPE table when ``rope``)."""
    ada = sd.get("blocks.0.adaLN_modulation.1.weight")
    options = LightningOptions(swiglu="blocks.0.mlp.w12.weight" in sd, rmsnorm="blocks.0.norm1.weight" in sd,
                               rope="feat_rope.freqs_cos" in sd,
                               wo_shift=ada is not None and ada.shape[0] == 4 * hidden)
    if not any(dataclasses.astuple(options)):
        return {}
    out = dataclasses.asdict(options)
    if options.swiglu:
        out["mlp_ratio"] = _mlp_ratio_of(hidden, int(sd["blocks.0.mlp.w12.weight"].shape[0]) // 2)
    if options.rope:
        out["head_dim"] = int(sd["feat_rope.freqs_cos"].shape[-1])
    return out
