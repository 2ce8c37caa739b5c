"""Building blocks of the adaLN-Zero transformer (official DiT / SiT / REPA parameter names)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from repa_probe.errors import ReproError

FREQUENCY_DIM = 256  # sinusoidal features fed to the timestep MLP


class ModelInputError(ReproError, ValueError):
    """Invalid model configuration or input tensor (one-line message)."""


def timestep_embedding(t: torch.Tensor, dim: int = FREQUENCY_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of ``t: (B,)`` (float or int, used as given) -> ``(B, dim)`` float32.

    Frequencies ``exp(-ln(max_period) * i / (dim/2))``; the output is ``[cos, sin]`` concatenated
    (a zero column is appended for odd ``dim``).
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def sincos_pos_embed_2d(dim: int, grid_size: int, device=None) -> torch.Tensor:
    """Fixed 2-D sin-cos position table ``(grid_size**2, dim)`` float32 (MAE/DiT layout).

    Tokens are in raster order (row-major). The first ``dim/2`` channels encode the column
    index and the last ``dim/2`` the row index; each half is ``[sin(pos*w), cos(pos*w)]`` with
    ``w_k = 10000 ** (-k / (dim/4))``. Computed in float64.
    """
    if dim % 4:
        raise ModelInputError(f"hidden_size must be divisible by 4 for the 2-D sin-cos table, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)
    coords = torch.arange(grid_size, dtype=torch.float64, device=device)
    rows = coords.repeat_interleave(grid_size)  # row index of each raster token
    cols = coords.repeat(grid_size)  # column index of each raster token

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        angle = pos[:, None] * omega[None, :]
        return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)

    return torch.cat([one_axis(cols), one_axis(rows)], dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: ``x: (B, T, D)``, ``shift, scale: (B, D)`` -> ``x * (1 + scale) + shift``."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """``(B, C, H, W)`` -> ``(B, T, D)`` with a stride-p convolution (``proj``), raster token order.

    Made contiguous once here: the transposed view would give the whole residual stream a (B, D, T) layout,
    so every LayerNorm would copy its input and the gate/modulate ops run strided (~3% of a CPU step)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class TimestepEmbedder(nn.Module):
    """``t: (B,)`` -> ``(B, D)``: 256 sinusoidal features, then Linear-SiLU-Linear (``mlp.{0,2}``)."""

    def __init__(self, hidden_size: int, frequency_dim: int = FREQUENCY_DIM):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_dim))


class LabelEmbedder(nn.Module):
    """``y: (B,)`` int -> ``(B, D)``. The table has a null row (index ``num_classes``) when
    ``class_dropout_prob > 0``; dropping labels is done by the objective, never here."""

    def __init__(self, num_classes: int, hidden_size: int, class_dropout_prob: float):
        super().__init__()
        self.num_rows = num_classes + int(class_dropout_prob > 0)
        self.embedding_table = nn.Embedding(self.num_rows, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


class Attention(nn.Module):
    """Multi-head self-attention with timm's parameter names (``qkv``, ``q_norm``, ``k_norm``, ``proj``).

    ``qk_norm`` adds a LayerNorm over ``head_dim`` (with affine, eps 1e-5) on queries and keys.
    Uses ``F.scaled_dot_product_attention``. ``x: (B, T, D)`` -> ``(B, T, D)``.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=True)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x: (B, T, D)`` -> q, k, v each ``(B, heads, T, head_dim)`` (q/k normalised if qk_norm)."""
        b, t, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv_heads(x)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    """``fc1`` -> GELU (tanh approximation) -> ``fc2``; ``(B, T, D)`` -> ``(B, T, D)``."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """adaLN-Zero transformer block. ``x: (B, T, D)``, ``c: (B, D)`` -> ``(B, T, D)``.

    ``adaLN_modulation(c)`` is split into shift/scale/gate for attention, then for the MLP.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    """Modulated LayerNorm then ``linear``: ``(B, T, D)`` -> ``(B, T, p*p*out_channels)``.

    ``cls_token_dim > 0`` (REG) adds ``linear_cls: D -> cls_token_dim``, applied by the model to the
    modulated class token (:meth:`modulated` gives the tokens before either linear map)."""

    def __init__(self, dim: int, patch_size: int, out_channels: int, cls_token_dim: int = 0):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        if cls_token_dim:
            self.linear_cls = nn.Linear(dim, cls_token_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def modulated(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``x: (B, T, D)``, ``c: (B, D)`` -> the modulated, normalised tokens ``(B, T, D)``."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return modulate(self.norm_final(x), shift, scale)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.linear(self.modulated(x, c))


PROJECTOR_TYPES = ("mlp", "conv")


class ConvProjector(nn.Module):
    """iREPA projector: one ``Conv2d(D, z_dim, k, stride 1, padding k // 2)`` on the square token grid.

    ``(B, T, D)`` -> ``(B, H, W, D)`` (row-major tokens, H = W = sqrt(T)) -> ``(B, D, H, W)`` -> conv ->
    ``(B, T, z_dim)``. The parameter is ``projection_layer`` (keys ``projection_layer.{weight,bias}``, as in
    End2End-Diffusion/iREPA's ``ProjectionLayer``); PyTorch's default Conv2d init (iREPA re-initialises only
    linear layers). ``k = 1`` is a per-token linear map.
    """

    def __init__(self, hidden_size: int, z_dim: int, kernel_size: int = 3):
        super().__init__()
        self.projection_layer = nn.Conv2d(hidden_size, z_dim, kernel_size, stride=1, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        side = math.isqrt(t)
        if side * side != t:
            raise ModelInputError(f"the conv projector needs a square token grid, got {t} tokens")
        grid = x.reshape(b, side, side, d).permute(0, 3, 1, 2)
        return self.projection_layer(grid).permute(0, 2, 3, 1).reshape(b, t, -1)


def build_projector(hidden_size: int, projector_dim: int, z_dim: int, kind: str = "mlp",
                    kernel_size: int = 3) -> nn.Module:
    """REPA projector (``kind="mlp"``): Linear(D, P) SiLU Linear(P, P) SiLU Linear(P, z_dim) (keys ``{0,2,4}``);
    iREPA projector (``kind="conv"``): :class:`ConvProjector` with a ``kernel_size`` x ``kernel_size`` kernel
    (``projector_dim`` unused)."""
    if kind == "conv":
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ModelInputError(f"projector kernel size must be a positive odd int, got {kernel_size!r}")
        return ConvProjector(hidden_size, z_dim, kernel_size)
    if kind != "mlp":
        raise ModelInputError(f"projector type must be one of {PROJECTOR_TYPES}, got {kind!r}")
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )
