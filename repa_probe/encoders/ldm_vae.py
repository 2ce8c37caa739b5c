"""CompVis LDM-layout VAE state dicts (REPA-E, VA-VAE, LightningDiT) read into diffusers' ``AutoencoderKL``.

REPA-E's ``models/autoencoder.py`` (the LDM ``AutoencoderKL``; ``ch`` 128 and GroupNorm(32) hard-coded, f8d4 =
SD-VAE, f16d32 = VA-VAE) names its weights ``encoder.down.{i}.block.{j}.*``, ``encoder.down.{i}.attn.{j}.{q,k,v,
proj_out}`` (1x1 convolutions), ``encoder.mid.{block_1,attn_1,block_2}``, ``decoder.up.{i}.*`` (level i = the
same resolution as ``encoder.down.{i}``), ``quant_conv``, ``post_quant_conv``. This module maps them one to one
onto diffusers' names (up levels reversed, attention convolutions as linears) and reads the architecture from the
shapes, so one network class (diffusers') serves SD-VAE, REPA-E's E2E-VAEs and VA-VAE. VA-VAE files also carry
``linear_proj``, ``foundation_model.*`` and ``loss.*`` (its alignment head and losses): they are not part of the
autoencoder and are dropped.

``latents_stats_path(vae_file)`` is REPA-E's naming of the statistics beside a VAE file
(``<name>.pt`` -> ``<name>-latents-stats.pt``: ``latents_scale``, ``latents_bias``, each (1, C, 1, 1);
``z = (raw - latents_bias) * latents_scale``).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch

from repa_probe.errors import ReproError

_IGNORED_PREFIXES = ("linear_proj", "foundation_model.", "loss.")
_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_TOP = {"conv_in": "conv_in", "conv_out": "conv_out", "norm_out": "conv_norm_out"}


class LDMLayoutError(ReproError, ValueError):
    """A state dict that is not an LDM-layout AutoencoderKL (one line, without a path)."""


def latents_stats_path(vae_file: str | Path) -> Path:
    """REPA-E's statistics file beside ``vae_file``: ``x.pt`` -> ``x-latents-stats.pt``."""
    p = Path(vae_file)
    return p.with_name(p.name[: -len(p.suffix)] + "-latents-stats.pt" if p.suffix else p.name + "-latents-stats.pt")


def is_ldm_vae(sd: Mapping[str, torch.Tensor]) -> bool:
    return "encoder.conv_in.weight" in sd and "quant_conv.weight" in sd and any(
        k.startswith("encoder.down.") for k in sd)


def _levels(sd: Mapping[str, torch.Tensor], side: str) -> int:
    return len({int(m.group(1)) for k in sd if (m := re.match(rf"{side}\.(\d+)\.", k))})


def diffusers_config(sd: Mapping[str, torch.Tensor]) -> dict:
    """``AutoencoderKL`` keywords read from an LDM state dict's shapes (levels, widths, blocks, attention, C)."""
    if not is_ldm_vae(sd):
        raise LDMLayoutError("not an LDM-layout VAE state dict (no encoder.conv_in / encoder.down.* / quant_conv)")
    levels = _levels(sd, "encoder.down")
    widths = tuple(int(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in range(levels))
    blocks = len({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    down = tuple("AttnDownEncoderBlock2D" if f"encoder.down.{i}.attn.0.q.weight" in sd else "DownEncoderBlock2D"
                 for i in range(levels))
    up = tuple("AttnUpDecoderBlock2D" if f"decoder.up.{i}.attn.0.q.weight" in sd else "UpDecoderBlock2D"
               for i in reversed(range(levels)))
    return dict(in_channels=int(sd["encoder.conv_in.weight"].shape[1]),
                out_channels=int(sd["decoder.conv_out.weight"].shape[0]),
                latent_channels=int(sd["post_quant_conv.weight"].shape[0]), layers_per_block=blocks,
                norm_num_groups=32, block_out_channels=widths, down_block_types=down, up_block_types=up)


def _map_key(key: str, levels: int) -> str:
    """One LDM key -> its diffusers name."""
    side, _, rest = key.partition(".")
    if side in ("quant_conv", "post_quant_conv"):
        return key
    m = re.match(r"(down|up)\.(\d+)\.(block|attn)\.(\d+)\.(\w+)\.(weight|bias)$", rest)
    if m:
        kind, i, sub, j, name, wb = m.groups()
        level = int(i) if kind == "down" else levels - 1 - int(i)
        if sub == "block":
            return f"{side}.{kind}_blocks.{level}.resnets.{j}.{_RESNET[name]}.{wb}"
        return f"{side}.{kind}_blocks.{level}.attentions.{j}.{_ATTN[name]}.{wb}"
    m = re.match(r"(down|up)\.(\d+)\.(downsample|upsample)\.conv\.(weight|bias)$", rest)
    if m:
        kind, i, which, wb = m.groups()
        level = int(i) if kind == "down" else levels - 1 - int(i)
        return f"{side}.{kind}_blocks.{level}.{which}rs.0.conv.{wb}"
    m = re.match(r"mid\.(block_1|block_2|attn_1)\.(\w+)\.(weight|bias)$", rest)
    if m:
        which, name, wb = m.groups()
        if which == "attn_1":
            return f"{side}.mid_block.attentions.0.{_ATTN[name]}.{wb}"
        return f"{side}.mid_block.resnets.{int(which[-1]) - 1}.{_RESNET[name]}.{wb}"
    m = re.match(r"(conv_in|conv_out|norm_out)\.(weight|bias)$", rest)
    if m:
        return f"{side}.{_TOP[m.group(1)]}.{m.group(2)}"
    raise LDMLayoutError(f"unexpected key {key!r} in an LDM VAE state dict")


def ldm_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an LDM VAE state dict to diffusers' ``AutoencoderKL`` keys (1x1 attention convs become linears)."""
    levels = _levels(sd, "encoder.down")
    out = {}
    for key, value in sd.items():
        if key.startswith(_IGNORED_PREFIXES):
            continue
        new = _map_key(key, levels)
        if ".attentions." in new and new.endswith(".weight") and value.ndim == 4:
            value = value[:, :, 0, 0]
        out[new] = value
    return out


def build_from_ldm(sd: Mapping[str, torch.Tensor]):
    """A float32 diffusers ``AutoencoderKL`` holding the LDM state dict ``sd`` (strict)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**diffusers_config(sd))
    converted = ldm_to_diffusers(sd)
    missing, unexpected = vae.load_state_dict({k: v.float() for k, v in converted.items()}, strict=False)
    if missing or unexpected:
        raise LDMLayoutError(f"LDM VAE does not fit diffusers' AutoencoderKL: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
    return vae
