"""Checkpoint I/O: atomic saving, safe loading, and model loading for our and official files.

Supported files (``load_model``):

* ``"repa-probe"`` — our training checkpoint: a dict with ``format = "repa-probe/1"``,
  ``model``/``ema`` state dicts, ``model_config`` (constructor keywords) and ``step``.
* ``"official-training"`` — a DiT / SiT / REPA training checkpoint: ``{"model", "ema", "opt",
  "args": argparse.Namespace[, "steps"]}``, or LightningDiT's ``{"model", "ema", "opt", "config": YAML dict}``
  (the step only in the file name, e.g. ``0080000.pt``).
* ``"official-state-dict"`` — a plain state dict (the released DiT-XL-2-256x256.pt, REPA's
  last.pt, LightningDiT's released file, ...), optionally with a DDP ``module.`` or torch.compile ``_orig_mod.``
  prefix.

Time-convention detection for official files (see :mod:`repa_probe.timesteps`): an explicit
``time_convention=`` wins; then the training ``args`` (REPA args carry ``enc_type``/``proj_coeff``/
``encoder_depth``: ``repa``; SiT args have ``model="SiT-..."`` or a ``path_type``: ``sit``; DiT args have
``model="DiT-..."``: ``ddpm``; LightningDiT's ``config.model.model_type="LightningDiT-..."``: ``sit``); then
shapes: LightningDiT's blocks (SwiGLU, RMSNorm, RoPE, wo_shift) mean ``sit`` (its t = 0 is noise), projectors or a
C-channel output ``repa``, a 2C-channel output ``ddpm``. DiT and official SiT state dicts are indistinguishable by shape, so a plain SiT state dict
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
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from repa_probe.models.layout import (LayoutError, detect_convention, encoder_depth_of, infer_config,  # noqa: F401
                                      is_state_dict, normalize_keys)
from repa_probe.models.layers import ModelInputError
from repa_probe.models.lightningdit import LightningOptions
from repa_probe.models.registry import from_config, size_name
from repa_probe.models.transformer import DiffusionTransformer, TransformerConfig
from repa_probe.atomic import atomic_write
from repa_probe.errors import ReproError, error_summary
from repa_probe.timesteps import TimeError, convention_of

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "repa-probe/1"  # the one definition: training.trainer writes it, load_model reads it


class CheckpointError(ReproError, RuntimeError):
    """A checkpoint cannot be read or does not fit the model (one-line message naming the file)."""


@dataclasses.dataclass
class ModelInfo:
    """What :func:`load_model` found.

    ``family``: architecture, "DiT" | "SiT" | "LightningDiT"; ``size``: "S" | "B" | "L" | "XL" or None;
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
    path = atomic_write(path, lambda f: torch.save(obj, f), binary=True)
    if hasattr(os, "O_DIRECTORY"):
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


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
        return f"{path}: truncated or corrupt checkpoint archive [{error_summary(exc)}]"
    return f"{path}: not a torch checkpoint, or corrupt [{error_summary(exc)}]"


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
               time_convention: str | None = None, loaded: object = None,
               encoder_depth: int | None = None) -> tuple[DiffusionTransformer, ModelInfo]:
    """Load a model from our or an official checkpoint (see the module docstring).

    Args:
        path: checkpoint file.
        num_heads: override the head count (shapes cannot tell it unless qk_norm is on).
        prefer_ema: take the ``ema`` weights when the file has them, else ``model``.
        time_convention: "repa" | "sit" | "ddpm" to override the detected convention (needed for plain
            official SiT state dicts, which look like DiT ones); ``repa_probe.timesteps.convention_of``
            maps a code base name ("REPA" | "SiT" | "DiT") to it.
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
    obj = safe_load(path) if loaded is None else loaded  # its errors name the path already
    try:
        forced = None if time_convention is None else convention_of(time_convention)
        source, step, config, args = _read_layout(obj, path)
        use_ema, sd = _pick_weights(obj, source, prefer_ema)
        config = _model_config(config, sd, args, num_heads, encoder_depth, forced)
        model = _build(config, sd)
    except (CheckpointError, LayoutError, TimeError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    info = ModelInfo(
        family=model.family, size=size_name(config), time_convention=model.time_convention,
        source_format=source, step=None if step is None else int(step), ema=use_ema,
        config=model.config, path=str(path),
    )
    return model, info


def _read_layout(obj: Any, path: Path) -> tuple[str, Any, dict | None, Any]:
    """``(source format, step, our model_config or None, official training args or None)`` of a loaded file."""
    if isinstance(obj, Mapping) and str(obj.get("format", "")).startswith("repa-probe/"):
        if not isinstance(obj.get("model_config"), Mapping):
            raise CheckpointError("repa-probe checkpoint without a model_config dict")
        return "repa-probe", obj.get("step"), dict(obj["model_config"]), None
    if isinstance(obj, Mapping) and ("model" in obj or "ema" in obj) and not is_state_dict(obj):
        args = obj.get("args", obj.get("config"))  # LightningDiT stores its YAML config instead of args
        return "official-training", obj.get("steps", obj.get("step", _step_from_name(path))), None, args
    if is_state_dict(obj):
        return "official-state-dict", _step_from_name(path), None, None
    kind = f"dict with keys {sorted(map(str, obj))[:6]}" if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointError(f"not a model checkpoint ({kind})")


def _pick_weights(obj: Any, source: str, prefer_ema: bool) -> tuple[bool, dict]:
    """``(whether the EMA entry was taken, the normalised state dict)``."""
    if source == "official-state-dict":
        return False, normalize_keys(obj)
    use_ema = bool(prefer_ema and is_state_dict(obj.get("ema")))
    raw = obj["ema"] if use_ema else obj.get("model")
    if not is_state_dict(raw):
        raise CheckpointError(f"the {'ema' if use_ema else 'model'} entry is not a state dict")
    return use_ema, normalize_keys(raw)


def _model_config(config: dict | None, sd: dict, args: Any, num_heads, encoder_depth, forced) -> dict:
    """Constructor keywords: the stored ``model_config`` (with the explicit overrides) or inferred from shapes."""
    if config is None:
        config = infer_config(sd, num_heads=num_heads, args=args, encoder_depth=encoder_depth)
        config["time_convention"] = forced or detect_convention(config, args)
    else:
        if "family" in config:  # our checkpoints before time_convention
            config["time_convention"] = convention_of(config.pop("family"))
        _check_stored_config(config)
        if num_heads is not None:
            config["num_heads"] = int(num_heads)
        if encoder_depth is not None:
            config["encoder_depth"] = encoder_depth_of(encoder_depth, config.get("encoder_depth"), 0, False)
        if forced is not None:
            config["time_convention"] = forced
    config.setdefault("time_convention", "repa")
    config["z_dims"] = list(config.get("z_dims", []))
    return config


def _check_stored_config(config: Mapping) -> None:
    """A ``model_config`` read from a file: only the constructors' keywords, each of its default's type
    (ints for ints, numbers for floats, a list of ints for ``z_dims``); a one-line CheckpointError otherwise."""
    defaults = {f.name: f.default for f in dataclasses.fields(TransformerConfig)}
    defaults.update(dataclasses.asdict(LightningOptions()))  # LightningDiT's switches
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise CheckpointError(f"model_config has unknown keys {unknown}; valid: {sorted(defaults)}")
    for key, value in config.items():
        default = defaults[key]
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif isinstance(default, str):
            ok = isinstance(value, str)
        elif default is None:  # bn_momentum (REPA-E): None or a number
            ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
        else:  # z_dims
            ok = isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        if not ok:
            raise CheckpointError(f"model_config[{key!r}] = {value!r} has the wrong type")


def _build(config: dict, sd: dict) -> DiffusionTransformer:
    """A float32 CPU model in eval mode holding ``sd`` (strict: keys and shapes checked first). ``config``
    has passed :func:`_check_stored_config` or was inferred by our code, so only the constructor's own value
    checks (:class:`ModelInputError`) describe the file; anything else is a bug and keeps its traceback."""
    try:
        with torch.device("meta"):
            model = from_config(config)
    except ModelInputError as exc:
        raise CheckpointError(f"cannot build a model from config: {exc}") from exc
    _check_against_model(model, sd)
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    model.pos_embed.requires_grad_(False)
    return model.eval()
