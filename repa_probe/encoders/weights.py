"""Where target-encoder weights come from and how they load: local file, torch hub cache, Hugging Face cache.

Official checkpoints are converted to timm's layout: DINOv2 hub files (``register_tokens``, ``mlp.w12``, a
37×37 ``pos_embed``), OpenAI CLIP state dicts (``visual.conv1``, ``transformer.resblocks``...; timm's converter),
MoCo v3 (``module.base_encoder.*``, with the ``norm13/fc13/norm14/fc14`` typos of REPA's ViT-L file fixed),
I-JEPA (the ``encoder`` entry) and MAE (the ``model`` entry). Classifier / pooling heads the target never uses
(``head``, ``attn_pool``, ``fc_norm``, and ``norm`` for encoders read without their final norm) are dropped; the
position embedding is resampled to the target grid; everything else loads strictly.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import socket
import threading
from pathlib import Path

import torch
import torch.nn as nn

from repa_probe.encoders.registry import EncoderSpec
from repa_probe.errors import ReproError


log = logging.getLogger(__name__)


class EncoderWeightsError(ReproError, RuntimeError):
    """Weights for a target encoder cannot be found or do not fit the architecture (one-line message)."""


def _hub_offline() -> bool:
    """True when HF_HUB_OFFLINE is set or huggingface.co cannot be reached within ~1.5 s."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    host = re.sub(r"^https?://", "", os.environ.get("HF_ENDPOINT", "huggingface.co")).split("/")[0]

    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host.split(":")[0], 443), timeout=1.5).close()
            result.append(True)
        except OSError:
            pass

    # DNS lookups ignore socket time-outs: bound the whole probe with a daemon thread
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout=2.0)
    return not result


def find_pretrained_weights(spec: EncoderSpec, source: str = "auto") -> tuple[Path, str]:
    """Local (or, when online, downloaded) weights file for ``spec``: ``(path, 'hub' | 'hf')``."""
    looked = []
    if source in ("auto", "hub") and spec.hub_file:
        path = Path(torch.hub.get_dir()) / "checkpoints" / spec.hub_file
        if path.is_file():
            return path, "hub"
        looked.append(str(path))
    if source in ("auto", "timm") and spec.hf_repo:
        import huggingface_hub as hf

        for fname in ("model.safetensors", "pytorch_model.bin"):
            cached = hf.try_to_load_from_cache(spec.hf_repo, fname)
            if isinstance(cached, str) and os.path.isfile(cached):
                return Path(cached), "hf"
        looked.append(f"HF cache {spec.hf_repo}")
        if not _hub_offline():
            try:
                return Path(hf.hf_hub_download(spec.hf_repo, "model.safetensors")), "hf"
            except Exception as e:  # noqa: BLE001 - reported below as one line
                looked.append(f"download failed: {type(e).__name__}")
        else:
            looked.append("hub offline")
    example = spec.hub_file or f"{spec.name}.pth"
    raise EncoderWeightsError(
        f"no pretrained weights for encoder {spec.name} (looked: {'; '.join(looked) or 'none available'}); "
        f"set encoder.weights=/path/to/{example} or encoder.pretrained=false for random init")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` or torch file (``weights_only=True``); unwraps ``model``/``state_dict``."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - turned into a one-line error
        if "TorchScript" in str(e):
            raise EncoderWeightsError(
                f"{path}: a TorchScript archive (e.g. OpenAI clip.load's cache) is not read (unsafe to unpickle); "
                "save its state_dict() to a .pth once, or use the timm/HF weights, and set encoder.weights") from e
        raise EncoderWeightsError(f"{path}: cannot read weights ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''})") from e
    for key in ("model", "state_dict", "encoder"):  # MAE, MoCo v3, I-JEPA wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EncoderWeightsError(f"{path}: not a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


_HEAD_MODULES = ("head", "attn_pool", "fc_norm", "norm")  # dropped from a file when the backbone lacks them
_MOCOV3_TYPOS = {"blocks.13.norm13.": "blocks.13.norm1.", "blocks.13.mlp.fc13.": "blocks.13.mlp.fc1.",
                 "blocks.14.norm14.": "blocks.14.norm2.", "blocks.14.mlp.fc14.": "blocks.14.mlp.fc2."}


def _official_to_timm(state: dict[str, torch.Tensor], backbone: nn.Module) -> dict[str, torch.Tensor]:
    """Rename the official DINOv2 / OpenAI CLIP / MoCo v3 key layouts to timm's (other layouts pass through)."""
    if "mask_token" in state or "register_tokens" in state:  # DINOv2 hub file
        state.pop("mask_token", None)
        if "register_tokens" in state:
            state["reg_token"] = state.pop("register_tokens")
            state["cls_token"] = state["cls_token"] + state["pos_embed"][:, :1]
            state["pos_embed"] = state["pos_embed"][:, 1:]
        return {re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", k)): v
                for k, v in state.items()}
    if any(k.startswith("base_encoder.") for k in state):  # MoCo v3 (``module.`` already stripped)
        out = {}
        for k, v in state.items():
            if k.startswith("base_encoder."):
                k = k[len("base_encoder."):]
                for typo, fix in _MOCOV3_TYPOS.items():
                    k = k.replace(typo, fix)
                out[k] = v
        return out
    for prefix in ("visual.", ""):  # OpenAI CLIP (full model or its visual tower)
        if f"{prefix}class_embedding" in state:
            from timm.models.vision_transformer import _convert_openai_clip

            return _convert_openai_clip(state, backbone, prefix=prefix)
    return state


def convert_state_dict(state: dict[str, torch.Tensor], backbone: nn.Module) -> dict[str, torch.Tensor]:
    """Official layouts -> timm keys (if needed), unused heads dropped, ``pos_embed`` resampled to the backbone grid.

    DINOv2 official layout: ``cls_token``, ``pos_embed`` (1, 1 + N, D) incl. the CLS position, ``mask_token``,
    ``register_tokens`` (1, R, D), ``blocks.i.mlp.w12/w3`` for the SwiGLU giant. timm's register models
    use ``no_embed_class``: the CLS position is folded into ``cls_token`` and ``pos_embed`` is (1, N, D).
    """
    from timm.layers import resample_abs_pos_embed

    state = _official_to_timm(dict(state), backbone)
    own = {k.split(".")[0] for k in backbone.state_dict()}
    state = {k: v for k, v in state.items() if k.split(".")[0] in own or k.split(".")[0] not in _HEAD_MODULES}
    pos = state.get("pos_embed")
    target = getattr(backbone, "pos_embed", None)
    if pos is not None and target is not None and pos.ndim == 3:
        prefix = 0 if getattr(backbone, "no_embed_class", False) else backbone.num_prefix_tokens
        old = pos.shape[1] - prefix
        side = math.isqrt(max(old, 0))
        new_grid = list(backbone.patch_embed.grid_size)
        if side * side == old and side > 0 and [side, side] != new_grid:
            state["pos_embed"] = resample_abs_pos_embed(
                pos.float(), new_size=new_grid, old_size=[side, side], num_prefix_tokens=prefix,
                interpolation="bicubic", antialias=True).to(pos.dtype)
    return state


def load_strict(backbone: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """``load_state_dict(strict=True, assign=True)`` (works for a backbone built on the meta device) with a
    one-line :class:`EncoderWeightsError` on any key or shape mismatch."""
    expected = backbone.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]

    def few(items):
        return ", ".join(items[:3]) + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")

    problems = [f"{label}: {few(items)}" for label, items in
                (("missing", missing), ("unexpected", unexpected), ("shape (file vs model)", shapes)) if items]
    if problems:
        raise EncoderWeightsError(f"{path}: weights do not fit the encoder ({'; '.join(problems)})")
    # weights keep the model's dtype (float32), whatever the file stores
    state = {k: v.to(expected[k].dtype).contiguous() for k, v in state.items()}
    backbone.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, t in list(backbone.named_parameters()) + list(backbone.named_buffers()) if t.is_meta]
    if leftover:
        raise EncoderWeightsError(f"{path}: tensors not covered by the weights: {', '.join(leftover[:3])}")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
