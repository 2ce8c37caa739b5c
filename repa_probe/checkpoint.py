"""Checkpoint I/O: atomic saving, safe loading, and model loading for our and official files.

Supported files (``load_model``):

* ``"repa-probe"`` — our training checkpoint: a dict with ``format = "repa-probe/1"``,
  ``model``/``ema`` state dicts, ``model_config`` (constructor keywords) and ``step``.
* ``"official-training"`` — a DiT / SiT / REPA training checkpoint: ``{"model", "ema", "opt",
  "args": argparse.Namespace[, "steps"]}``.
* ``"official-state-dict"`` — a plain state dict (the released DiT-XL-2-256x256.pt, REPA's
  last.pt, ...), optionally with a DDP ``module.`` or torch.compile ``_orig_mod.`` prefix.

Time-convention detection for official files (see :mod:`repa_probe.timesteps`): an explicit
``time_convention=`` wins; then the training ``args`` (REPA args carry ``enc_type``/``proj_coeff``/
``encoder_depth``: ``repa``; SiT args have ``model="SiT-..."`` or a ``path_type``: ``sit``; DiT args have
``model="DiT-..."``: ``ddpm``); then shapes: projectors or a C-channel output mean ``repa``, a 2C-channel
output ``ddpm``. DiT and official SiT state dicts are indistinguishable by shape, so a plain SiT state dict
needs ``time_convention="sit"``. Our older checkpoints store ``family`` ("DiT" / "SiT" / "REPA") in
``model_config``; it is read as the matching convention.

Everything is loaded with ``torch.load(weights_only=True)``; every failure raises
:class:`CheckpointError` with a one-line message that starts with the file path.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from repa_probe.models.registry import size_name
from repa_probe.models.transformer import DiffusionTransformer
from repa_probe.errors import ReproError
from repa_probe.timesteps import TimeError, convention_of

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "repa-probe/1"  # the one definition: training.trainer writes it, load_model reads it
DEFAULT_ENCODER_DEPTH = 8
HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1152: 16}
_REQUIRED_KEYS = ("x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight",
                  "final_layer.linear.weight")
_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(ReproError, RuntimeError):
    """A checkpoint cannot be read or does not fit the model (one-line message naming the file)."""


@dataclasses.dataclass
class ModelInfo:
    """What :func:`load_model` found.

    ``family``: architecture, "DiT" | "SiT"; ``size``: "S" | "B" | "L" | "XL" or None;
    ``time_convention``: "ddpm" | "sit" | "repa"; ``source_format``: "repa-probe" |
    "official-state-dict" | "official-training"; ``step``: training step or None; ``ema``: True
    when the weights came from an ``ema`` entry (plain state dicts report False even though the
    released official files hold EMA weights); ``config``: constructor keywords; ``path``.
    """

    family: str
    size: str | None
    time_convention: str
    source_format: str
    step: int | None
    ema: bool
    config: dict
    path: str


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file in the same directory, fsync, ``os.replace``, fsync the directory.

    A crash leaves either the old file or the new one, never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual file mode
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _one_line(exc: BaseException, limit: int = 160) -> str:
    """``"<ExcType>: <first non-empty line, truncated>"``."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _describe_load_error(path: Path, exc: BaseException) -> str:
    """One line saying why ``torch.load`` failed on ``path``."""
    unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
    if unsafe:
        return (f"{path}: contains {unsafe.group(1)}, which weights_only=True loading does not allow "
                f"(not a plain tensor/Namespace checkpoint)")
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(exc))
    if detail:
        return f"{path}: not a torch checkpoint, or corrupt [weights-only unpickler: {detail.group(1)[:120]}]"
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PK\x03\x04":
        return f"{path}: truncated or corrupt checkpoint archive [{_one_line(exc)}]"
    return f"{path}: not a torch checkpoint, or corrupt [{_one_line(exc)}]"


def safe_load(path: str | os.PathLike, extra_globals: Iterable[Any] = ()) -> Any:
    """``torch.load(path, weights_only=True, map_location="cpu")`` with ``argparse.Namespace``
    (and ``extra_globals``) allow-listed. Any failure raises ``CheckpointError("<path>: ...")``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    try:
        with torch.serialization.safe_globals([argparse.Namespace, *extra_globals]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every loader failure becomes one CheckpointError
        raise CheckpointError(_describe_load_error(path, exc)) from exc


def load_training_checkpoint(path: str | os.PathLike) -> dict:
    """A training checkpoint written by ``TrainState.state_dict`` (``format == CHECKPOINT_FORMAT``), loaded
    with :func:`safe_load`; anything else raises :class:`CheckpointError` naming the file."""
    state = safe_load(path)
    if not isinstance(state, Mapping) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a repa-probe training checkpoint (no format={CHECKPOINT_FORMAT!r})")
    return dict(state)


def _is_state_dict(obj: Any) -> bool:
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


def _heads_for(hidden: int, state_dict: Mapping[str, torch.Tensor], num_heads: int | None) -> int:
    qn = state_dict.get("blocks.0.attn.q_norm.weight")
    if qn is not None:  # qk_norm LayerNorm is head_dim wide, so heads are readable
        heads_from_shape = hidden // qn.shape[0]
        if num_heads is not None and num_heads != heads_from_shape:
            raise CheckpointError(f"num_heads={num_heads} contradicts q_norm width {qn.shape[0]} "
                                  f"(head_dim), which implies {heads_from_shape} heads")
        return heads_from_shape
    if num_heads is not None:
        return int(num_heads)
    if hidden in HEADS_BY_WIDTH:
        return HEADS_BY_WIDTH[hidden]
    if hidden % 64 == 0:
        return hidden // 64
    raise CheckpointError(f"cannot guess the number of heads for width {hidden}; pass num_heads=")


def infer_config(state_dict: Mapping[str, torch.Tensor], num_heads: int | None = None,
                 args: Any = None, encoder_depth: int | None = None) -> dict:
    """Constructor keywords (without ``time_convention``) read from tensor shapes.

    Reads depth, width, patch, ``input_size`` (= sqrt(T) * patch from ``pos_embed``),
    ``in_channels``, ``num_classes`` (the table is assumed to include the null row unless
    ``args.num_classes`` says otherwise), ``learn_sigma`` (2C output), projector dims and type (REPA's
    MLP, or iREPA's conv ``projectors.k.projection_layer`` and its kernel), ``qk_norm`` and ``mlp_ratio``.
    Heads: from the q_norm width when ``qk_norm``, else ``num_heads`` or the
    rule 384→6, 768→12, 1024→16, 1152→16, otherwise width/64. ``encoder_depth`` (1-based block the
    projectors read) is in no shape: the ``encoder_depth`` argument, else ``args.encoder_depth`` (the two
    must agree), else 8 clamped to [1, depth] with a logged warning when the file has projectors (see
    :func:`load_model`). Raises ``CheckpointError`` (message without a path) on an unknown layout.
    """
    sd = normalize_keys(state_dict)
    if any(k.startswith("decoder_blocks.") for k in sd):
        raise CheckpointError("legacy REPA encoder/decoder layout (decoder_blocks.*) is not supported")
    missing = [k for k in _REQUIRED_KEYS if k not in sd]
    if missing:
        raise CheckpointError(f"unknown key layout, not a DiT/SiT/REPA state dict (missing {', '.join(missing)})")
    pw = sd["x_embedder.proj.weight"]
    if pw.ndim != 4 or pw.shape[2] != pw.shape[3]:
        raise CheckpointError(f"x_embedder.proj.weight has unexpected shape {tuple(pw.shape)}")
    hidden, in_ch, patch = int(pw.shape[0]), int(pw.shape[1]), int(pw.shape[2])
    tokens = int(sd["pos_embed"].shape[1]) if sd["pos_embed"].ndim == 3 else -1
    grid = int(round(max(tokens, 0) ** 0.5))
    if tokens < 1 or grid * grid != tokens:
        raise CheckpointError(f"pos_embed shape {tuple(sd['pos_embed'].shape)} is not (1, g*g, D)")
    block_ids = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = len(block_ids)
    if depth == 0 or block_ids != set(range(depth)):
        raise CheckpointError(f"blocks.* indices are not 0..N-1 (found {sorted(block_ids)[:8]}...)")
    out_features = int(sd["final_layer.linear.weight"].shape[0])
    if out_features % (patch * patch):
        raise CheckpointError(f"final_layer.linear has {out_features} outputs, not a multiple of patch²={patch * patch}")
    out_ch = out_features // (patch * patch)
    if out_ch not in (in_ch, 2 * in_ch):
        raise CheckpointError(f"final layer has {out_ch} channels; expected {in_ch} or {2 * in_ch}")
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    if fc1 is None:
        raise CheckpointError("unknown key layout (blocks.0.mlp.fc1.weight missing)")
    rows = int(sd["y_embedder.embedding_table.weight"].shape[0])
    declared = _args_get(args, "num_classes")
    if declared is not None and rows in (int(declared), int(declared) + 1):
        num_classes, dropout = int(declared), (0.1 if rows == int(declared) + 1 else 0.0)
    else:
        num_classes, dropout = rows - 1, 0.1
    proj_ids = sorted({int(m.group(1)) for k in sd if (m := re.match(r"projectors\.(\d+)\.", k))})
    if proj_ids != list(range(len(proj_ids))):
        raise CheckpointError(f"projectors.* indices are not 0..K-1 (found {proj_ids})")
    convs = [sd.get(f"projectors.{k}.projection_layer.weight") for k in proj_ids]
    conv = bool(proj_ids) and all(w is not None and w.ndim == 4 for w in convs)  # iREPA conv projector
    z_dims = [int(w.shape[0]) for w in convs] if conv else [
        int(sd[f"projectors.{k}.4.weight"].shape[0]) for k in proj_ids if f"projectors.{k}.4.weight" in sd]
    if len(z_dims) != len(proj_ids):
        raise CheckpointError("unknown projector layout (expected projectors.{k}.{0,2,4} or iREPA's conv "
                              "projectors.{k}.projection_layer)")
    projector_dim = int(sd["projectors.0.0.weight"].shape[0]) if z_dims and not conv else 2048
    enc_depth = _encoder_depth(encoder_depth, _args_get(args, "encoder_depth"), depth, bool(z_dims))
    return dict(
        input_size=grid * patch, patch_size=patch, in_channels=in_ch, hidden_size=hidden, depth=depth,
        num_heads=_heads_for(hidden, sd, num_heads), mlp_ratio=float(fc1.shape[0]) / hidden,
        num_classes=num_classes, class_dropout_prob=dropout, learn_sigma=out_ch == 2 * in_ch,
        qk_norm="blocks.0.attn.q_norm.weight" in sd, encoder_depth=enc_depth,
        z_dims=z_dims, projector_dim=projector_dim,
        projector_type="conv" if conv else "mlp", projector_kernel=int(convs[0].shape[-1]) if conv else 3,
    )


def _encoder_depth(explicit: int | None, from_args: int | None, depth: int, has_projectors: bool) -> int:
    """The projectors' block: ``explicit`` or the file's ``args`` value (a contradiction is an error);
    unknown -> REPA's default 8 (clamped to depth), with a warning when projectors make it matter."""
    if explicit is not None and from_args is not None and int(explicit) != int(from_args):
        raise CheckpointError(f"encoder_depth={explicit} contradicts the encoder_depth={from_args} stored in the file")
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


def _detect_convention(config: dict, args: Any) -> str:
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


def _step_from_name(path: Path) -> int | None:
    return int(path.stem) if path.stem.isdigit() else None


def _check_against_model(model: DiffusionTransformer, sd: Mapping[str, torch.Tensor]) -> None:
    """Compare keys and shapes with ``model`` (a meta-device model); raise a one-line CheckpointError."""
    ref = model.state_dict()
    missing = [k for k in ref if k not in sd]
    unexpected = [k for k in sd if k not in ref]
    if missing or unexpected:
        def show(keys):
            return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
        parts = ([f"missing keys: {show(missing)}"] if missing else []) + (
            [f"unexpected keys: {show(unexpected)}"] if unexpected else [])
        raise CheckpointError("state dict does not match the model: " + "; ".join(parts))
    for k, v in ref.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise CheckpointError(f"shape mismatch for {k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}")


def load_model(path: str | os.PathLike, num_heads: int | None = None, prefer_ema: bool = True,
               time_convention: str | None = None, loaded: object = None, encoder_depth: int | None = None,
               family: str | None = None) -> tuple[DiffusionTransformer, ModelInfo]:
    """Load a model from our or an official checkpoint (see the module docstring).

    Args:
        path: checkpoint file.
        num_heads: override the head count (shapes cannot tell it unless qk_norm is on).
        prefer_ema: take the ``ema`` weights when the file has them, else ``model``.
        time_convention: "repa" | "sit" | "ddpm" to override the detected convention (needed for plain
            official SiT state dicts, which look like DiT ones). ``family`` ("REPA" | "SiT" | "DiT") is
            the same choice by code base.
        loaded: the file's content when the caller already ``safe_load``-ed it (avoids reading it twice).
        encoder_depth: the 1-based block REPA's projectors read. Official REPA state dicts do not store
            it and no tensor shape reveals it; training files carry it in ``args`` and ours in
            ``model_config`` (a different value here is an error). When it cannot be known, 8 (REPA's
            default, clamped to depth) is assumed with a logged warning naming this option rather than an
            error: the released REPA file is an XL/2 aligned at 8, and hidden states, outputs, sampling
            and FID do not depend on it; only the projected tokens ``zs`` do.

    Returns:
        ``(model, info)``: a float32 CPU model in eval mode, loaded strictly, and its ModelInfo.
    """
    path = Path(path)
    try:
        forced = None if (time_convention or family) is None else convention_of(time_convention or family)
    except TimeError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    obj = safe_load(path) if loaded is None else loaded
    try:
        args = None
        if isinstance(obj, Mapping) and str(obj.get("format", "")).startswith("repa-probe/"):
            source, step = "repa-probe", obj.get("step")
            if not isinstance(obj.get("model_config"), Mapping):
                raise CheckpointError("repa-probe checkpoint without a model_config dict")
            config = dict(obj["model_config"])
        elif isinstance(obj, Mapping) and ("model" in obj or "ema" in obj) and not _is_state_dict(obj):
            source, args = "official-training", obj.get("args")
            step = obj.get("steps", obj.get("step", _step_from_name(path)))
            config = None
        elif _is_state_dict(obj):
            source, step, config = "official-state-dict", _step_from_name(path), None
        else:
            kind = f"dict with keys {sorted(map(str, obj))[:6]}" if isinstance(obj, Mapping) else type(obj).__name__
            raise CheckpointError(f"not a model checkpoint ({kind})")

        if source == "official-state-dict":
            use_ema, raw = False, obj
        else:
            use_ema = bool(prefer_ema and _is_state_dict(obj.get("ema")))
            raw = obj["ema"] if use_ema else obj.get("model")
            if not _is_state_dict(raw):
                raise CheckpointError(f"the {'ema' if use_ema else 'model'} entry is not a state dict")
        sd = normalize_keys(raw)

        if config is None:
            config = infer_config(sd, num_heads=num_heads, args=args, encoder_depth=encoder_depth)
            config["time_convention"] = forced or _detect_convention(config, args)
        else:
            if "family" in config:  # our checkpoints before time_convention
                config["time_convention"] = convention_of(config.pop("family"))
            if num_heads is not None:
                config["num_heads"] = int(num_heads)
            if encoder_depth is not None:
                config["encoder_depth"] = _encoder_depth(encoder_depth, config.get("encoder_depth"), 0, False)
            if forced is not None:
                config["time_convention"] = forced
        config.setdefault("time_convention", "repa")
        config["z_dims"] = list(config.get("z_dims", []))
        try:
            with torch.device("meta"):
                model = DiffusionTransformer(**config)
            _check_against_model(model, sd)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"cannot build a model from config: {_one_line(exc)}") from exc
        sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
        model.load_state_dict(sd, strict=True, assign=True)
        model.pos_embed.requires_grad_(False)
    except (CheckpointError, TimeError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    model.eval()
    info = ModelInfo(
        family=model.family, size=size_name(config), time_convention=model.time_convention,
        source_format=source, step=None if step is None else int(step), ema=use_ema,
        config=model.config, path=str(path),
    )
    return model, info
