"""The official state-dict layout of DiT / SiT / REPA / iREPA / LightningDiT models, read back into constructor
keywords.

Tensor shapes tell depth, width, patch, input size, channels, classes, ``learn_sigma``, projector dims and type,
``qk_norm``, the MLP ratio and LightningDiT's switches (:func:`repa_probe.models.lightningdit.read_layout`); the
head count follows the official sizes' rule unless ``qk_norm`` or a RoPE table reveals it; the projectors'
``encoder_depth`` is in no shape. :func:`detect_convention` reads a file's time convention
from its training ``args`` or its shapes (see :mod:`repa_probe.checkpoint`, which uses this module).
"""
from __future__ import annotations

import logging
import re
from typing import Any, Mapping

import torch

from repa_probe.errors import ReproError
from repa_probe.models.layers import ModelInputError
from repa_probe.models.lightningdit import OPTION_NAMES as LIGHTNING_OPTIONS
from repa_probe.models.lightningdit import read_layout as read_lightning_layout

log = logging.getLogger("repa_probe.checkpoint")

DEFAULT_ENCODER_DEPTH = 8
HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1152: 16}
_REQUIRED_KEYS = ("x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight",
                  "final_layer.linear.weight")
_PREFIXES = ("module.", "_orig_mod.")


class LayoutError(ReproError, ValueError):
    """A state dict whose layout is not a DiT / SiT / REPA one (one-line message, without a path)."""


def is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())


def normalize_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip a ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) prefix shared by all keys; iREPA's MLP
    projector keys ``projectors.k.projection_layer.{0,2,4}.*`` become REPA's ``projectors.k.{0,2,4}.*``."""
    sd = dict(state_dict)
    changed = True
    while changed and sd:
        changed = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return {re.sub(r"^(projectors\.\d+\.)projection_layer\.(\d+\.)", r"\1\2", k): v for k, v in sd.items()}


def _args_get(args: Any, name: str, default=None):
    if isinstance(args, Mapping):
        return args.get(name, default)
    return getattr(args, name, default)


def _heads_for(hidden: int, state_dict: Mapping[str, torch.Tensor], num_heads: int | None,
               head_dim: int | None = None) -> int:
    qn = state_dict.get("blocks.0.attn.q_norm.weight")
    if qn is not None:  # qk_norm LayerNorm is head_dim wide, so heads are readable
        heads_from_shape = hidden // qn.shape[0]
        if num_heads is not None and num_heads != heads_from_shape:
            raise LayoutError(f"num_heads={num_heads} contradicts q_norm width {qn.shape[0]} "
                                  f"(head_dim), which implies {heads_from_shape} heads")
        return heads_from_shape
    if head_dim:  # LightningDiT's RoPE table is head_dim wide
        if num_heads is not None and num_heads * head_dim != hidden:
            raise LayoutError(f"num_heads={num_heads} contradicts the RoPE table width {head_dim} (head_dim), "
                              f"which implies {hidden // head_dim} heads")
        return hidden // head_dim
    if num_heads is not None:
        return int(num_heads)
    if hidden in HEADS_BY_WIDTH:
        return HEADS_BY_WIDTH[hidden]
    if hidden % 64 == 0:
        return hidden // 64
    raise LayoutError(f"cannot guess the number of heads for width {hidden}; pass num_heads=")


def infer_config(state_dict: Mapping[str, torch.Tensor], num_heads: int | None = None,
                 args: Any = None, encoder_depth: int | None = None) -> dict:
    """Constructor keywords (without ``time_convention``) read from tensor shapes.

    Reads depth, width, patch, ``input_size`` (= sqrt(T) * patch from ``pos_embed``),
    ``in_channels``, REG's ``cls_token_dim`` (from ``cls_projectors2``; its ``pos_embed`` has one more row),
    ``num_classes`` (the table is assumed to include the null row unless
    ``args.num_classes`` says otherwise), ``learn_sigma`` (2C output), projector dims and type (REPA's
    MLP, or iREPA's conv ``projectors.k.projection_layer`` and its kernel), ``qk_norm``, ``mlp_ratio`` and
    LightningDiT's ``swiglu`` / ``rmsnorm`` / ``rope`` / ``wo_shift`` (present only for such a layout); REPA-E's
    ``bn.*`` buffers give ``bn_momentum`` (``args.bn_momentum``, else 0.1).
    Heads: from the q_norm width when ``qk_norm``, else from the RoPE table, else ``num_heads`` or the
    rule 384→6, 768→12, 1024→16, 1152→16, otherwise width/64. ``encoder_depth`` (1-based block the
    projectors read) is in no shape: the ``encoder_depth`` argument, else ``args.encoder_depth`` (the two
    must agree), else 8 clamped to [1, depth] with a logged warning when the file has projectors (see
    :func:`load_model`). Raises ``LayoutError`` (message without a path) on an unknown layout.
    """
    sd = normalize_keys(state_dict)
    if any(k.startswith("decoder_blocks.") for k in sd):
        raise LayoutError("legacy REPA encoder/decoder layout (decoder_blocks.*) is not supported")
    missing = [k for k in _REQUIRED_KEYS if k not in sd]
    if missing:
        raise LayoutError(f"unknown key layout, not a DiT/SiT/REPA state dict (missing {', '.join(missing)})")
    pw = sd["x_embedder.proj.weight"]
    if pw.ndim != 4 or pw.shape[2] != pw.shape[3]:
        raise LayoutError(f"x_embedder.proj.weight has unexpected shape {tuple(pw.shape)}")
    hidden, in_ch, patch = int(pw.shape[0]), int(pw.shape[1]), int(pw.shape[2])
    cls_in = sd.get("cls_projectors2.weight")  # REG: the class token's input map (D, cls_token_dim)
    cls_token_dim = int(cls_in.shape[1]) if cls_in is not None and cls_in.ndim == 2 else 0
    tokens = int(sd["pos_embed"].shape[1]) - int(cls_token_dim > 0) if sd["pos_embed"].ndim == 3 else -1
    grid = int(round(max(tokens, 0) ** 0.5))
    if tokens < 1 or grid * grid != tokens:
        raise LayoutError(f"pos_embed shape {tuple(sd['pos_embed'].shape)} is not (1, g*g, D)")
    block_ids = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = len(block_ids)
    if depth == 0 or block_ids != set(range(depth)):
        raise LayoutError(f"blocks.* indices are not 0..N-1 (found {sorted(block_ids)[:8]}...)")
    out_features = int(sd["final_layer.linear.weight"].shape[0])
    if out_features % (patch * patch):
        raise LayoutError(f"final_layer.linear has {out_features} outputs, not a multiple of patch²={patch * patch}")
    out_ch = out_features // (patch * patch)
    if out_ch not in (in_ch, 2 * in_ch):
        raise LayoutError(f"final layer has {out_ch} channels; expected {in_ch} or {2 * in_ch}")
    try:
        lightning = read_lightning_layout(sd, hidden)  # {} unless LightningDiT's switches show
    except ModelInputError as exc:
        raise LayoutError(str(exc)) from None
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    if fc1 is None and "mlp_ratio" not in lightning:
        raise LayoutError("unknown key layout (blocks.0.mlp.fc1.weight missing)")
    mlp_ratio = lightning.pop("mlp_ratio", None) or float(fc1.shape[0]) / hidden
    heads = _heads_for(hidden, sd, num_heads, lightning.pop("head_dim", None))
    rows = int(sd["y_embedder.embedding_table.weight"].shape[0])
    declared = _args_get(args, "num_classes")
    if declared is not None and rows in (int(declared), int(declared) + 1):
        num_classes, dropout = int(declared), (0.1 if rows == int(declared) + 1 else 0.0)
    else:
        num_classes, dropout = rows - 1, 0.1
    proj = _projectors(sd)
    enc_depth = encoder_depth_of(encoder_depth, _args_get(args, "encoder_depth"), depth, bool(proj["z_dims"]))
    if "bn.running_mean" in sd:  # REPA-E's latent BatchNorm; its momentum is in no shape (REPA-E's default 0.1)
        proj["bn_momentum"] = float(_args_get(args, "bn_momentum", 0.1) or 0.1)
    return dict(
        input_size=grid * patch, patch_size=patch, in_channels=in_ch, hidden_size=hidden, depth=depth,
        num_heads=heads, mlp_ratio=mlp_ratio,
        num_classes=num_classes, class_dropout_prob=dropout, learn_sigma=out_ch == 2 * in_ch,
        qk_norm="blocks.0.attn.q_norm.weight" in sd, encoder_depth=enc_depth, **proj, cls_token_dim=cls_token_dim,
        **lightning,
    )


def _projectors(sd: Mapping[str, torch.Tensor]) -> dict:
    """``z_dims``, ``projector_dim``, ``projector_type`` and ``projector_kernel`` of REPA's MLP projectors
    ``projectors.k.{0,2,4}`` or iREPA's conv ``projectors.k.projection_layer`` (none: ``z_dims == []``)."""
    proj_ids = sorted({int(m.group(1)) for k in sd if (m := re.match(r"projectors\.(\d+)\.", k))})
    if proj_ids != list(range(len(proj_ids))):
        raise LayoutError(f"projectors.* indices are not 0..K-1 (found {proj_ids})")
    convs = [sd.get(f"projectors.{k}.projection_layer.weight") for k in proj_ids]
    conv = bool(proj_ids) and all(w is not None and w.ndim == 4 for w in convs)  # iREPA conv projector
    z_dims = [int(w.shape[0]) for w in convs] if conv else [
        int(sd[f"projectors.{k}.4.weight"].shape[0]) for k in proj_ids if f"projectors.{k}.4.weight" in sd]
    if len(z_dims) != len(proj_ids):
        raise LayoutError("unknown projector layout (expected projectors.{k}.{0,2,4} or iREPA's conv "
                          "projectors.{k}.projection_layer)")
    return dict(z_dims=z_dims, projector_dim=int(sd["projectors.0.0.weight"].shape[0]) if z_dims and not conv else 2048,
                projector_type="conv" if conv else "mlp", projector_kernel=int(convs[0].shape[-1]) if conv else 3)


def encoder_depth_of(explicit: int | None, from_args: int | None, depth: int, has_projectors: bool) -> int:
    """The projectors' block: ``explicit`` or the file's ``args`` value (a contradiction is an error);
    unknown -> REPA's default 8 (clamped to depth), with a warning when projectors make it matter."""
    if explicit is not None and from_args is not None and int(explicit) != int(from_args):
        raise LayoutError(f"encoder_depth={explicit} contradicts the encoder_depth={from_args} stored in the file")
    value = explicit if explicit is not None else from_args
    if value is not None:  # without projectors the value is unused: keep it valid for the constructor
        return int(value) if has_projectors or not depth else min(max(int(value), 1), depth)
    assumed = min(DEFAULT_ENCODER_DEPTH, depth)
    if has_projectors:
        clamped = f" (REPA's default {DEFAULT_ENCODER_DEPTH}, clamped to depth)" if assumed != DEFAULT_ENCODER_DEPTH \
            else " (REPA's default, right for its released L and XL files)"
        log.warning("encoder_depth is not stored in this state dict and no shape reveals it: assuming block %d%s. "
                    "Pass encoder_depth= (CLI: --encoder-depth) if the projectors were trained at another block "
                    "(REPA aligns block 4 for SiT-B/2); only the projected tokens depend on it.", assumed, clamped)
    return assumed


def detect_convention(config: dict, args: Any) -> str:
    """A file's time convention from its training ``args`` (REPA's / SiT's / DiT's Namespace, LightningDiT's
    YAML ``config`` dict) or, failing that, its layout (LightningDiT's switches mean SiT's time)."""
    model_section = _args_get(args, "model") if args is not None else None
    if isinstance(model_section, Mapping) and str(model_section.get("model_type", "")).startswith("LightningDiT"):
        return "sit"
    if any(config.get(k) for k in LIGHTNING_OPTIONS):
        return "sit"
    if args is not None:
        if any(_args_get(args, k) is not None for k in ("enc_type", "proj_coeff", "encoder_depth")):
            return "repa"
        model_arg = str(_args_get(args, "model", "") or "")
        if model_arg.startswith("SiT") or _args_get(args, "path_type") is not None:
            return "sit"
        if model_arg.startswith("DiT"):
            return "ddpm"
    if config["z_dims"] or not config["learn_sigma"]:
        return "repa"
    return "ddpm"
