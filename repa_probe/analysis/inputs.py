"""Inputs of the alignment analysis: option parsing, checkpoints, and the shared dataset / encoder / VAE.

Everything here validates and loads; nothing computes features. Errors are one-line
:class:`AlignmentError` (or the loaders' own CheckpointError / EncoderWeightsError / VAEWeightsError /
DatasetError / ObjectiveError).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from repa_probe.errors import ReproError

log = logging.getLogger("repa_probe")

DEFAULT_TIMESTEPS = (0.0, 0.25, 0.5, 0.75, 1.0)
METRICS = ("cknna", "mutual_knn", "cka", "unbiased_cka", "cycle_knn")
TARGET_KINDS = ("cls", "mean_patch")
MAX_DEFAULT_SAMPLES = 10000
DEFAULT_SHAPES_SAMPLES = 512  # procedural data has no natural size; enough for k=10 CKNNA, fast on a CPU
KEEP_MODEL_PARAMS = 50_000_000  # models this small stay in memory between validation and analysis


class AlignmentError(ReproError, ValueError):
    """Bad input to the alignment analysis (one-line message)."""


# ------------------------------------------------------------------------------------------- parsing
def parse_timestep_list(text: str | Sequence) -> list:
    """``"0,0.5,1,250"`` -> ``[0.0, 0.5, 1.0, 250]``: values with a '.', an exponent, or equal to 0 / 1 are
    floats (times in [0, 1]; for DDPM fractions of the schedule, so 1 = step 999); other integers stay
    ints (DDPM steps). Lists pass through."""
    if not isinstance(text, str):
        return list(text)
    out = []
    for tok in (s.strip() for s in text.split(",")):
        try:
            if any(c in tok for c in ".eE") or tok in ("0", "1"):
                out.append(float(tok))
            else:
                out.append(int(tok))
        except ValueError:
            raise AlignmentError(f"--timesteps: {tok!r} is not a number (give e.g. 0,0.25,0.5)") from None
    return out


def parse_layer_list(text) -> str | list[int]:
    """``"all"`` or ``"1,4,8"`` (1-based block numbers) -> ``"all"`` or ``[1, 4, 8]``."""
    if text is None or text == "all":
        return "all"
    if not isinstance(text, str):
        return [int(v) for v in text]
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise AlignmentError(f"--layers must be 'all' or 1-based block numbers like 1,4,8, got {text!r}") from None


def parse_metric_list(text) -> list[str]:
    names = text.split(",") if isinstance(text, str) else list(text)
    names = [n.strip() for n in names if n.strip()]
    bad = [n for n in names if n not in METRICS]
    if bad or not names:
        raise AlignmentError(f"unknown metric(s) {bad or text!r}; choose from {', '.join(METRICS)}")
    return names


# -------------------------------------------------------------------------------------- checkpoints
@dataclasses.dataclass
class CheckpointEntry:
    """One checkpoint to analyse: ``label`` (short unique name), ``run`` (run directory name or None)."""

    path: Path
    label: str
    run: str | None
    info: Any
    cfg: Any  # repa_probe Config for our checkpoints, None for official files
    model: Any = None


def checkpoint_paths(items: Sequence) -> list[Path]:
    """Files as given; a directory means every checkpoint in it (or in its ``checkpoints/``), by step."""
    from repa_probe.training.rundir import list_checkpoints

    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            d = p / "checkpoints" if (p / "checkpoints").is_dir() else p
            found = [q for _, q in list_checkpoints(d)] or sorted(list(d.glob("*.pt")) + list(d.glob("*.pth")))
            if not found:
                raise AlignmentError(f"--ckpt {p}: directory has no checkpoints ({{step:07d}}.pt, *.pt or *.pth)")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise AlignmentError(f"--ckpt {p}: no such file or directory")
    if not out:
        raise AlignmentError("no checkpoints given (--ckpt PATH)")
    if len({q.resolve() for q in out}) != len(out):
        raise AlignmentError("the same checkpoint is listed twice in --ckpt")
    return out


WEIGHTS = ("auto", "ema", "model")


def _use_ema(weights: str, cfg, step) -> bool:
    """``auto``: the EMA unless it still weighs the initial weights by more than half (ema_decay**step > 0.5,
    e.g. fewer than ~6900 steps at decay 0.9999), in which case the raw model weights are used."""
    if weights != "auto":
        return weights == "ema"
    if cfg is None or step is None:
        return True
    return float(cfg.train.ema_decay) ** int(step) <= 0.5


def load_entries(paths: Sequence[Path], family: str | None = None, weights: str = "auto") -> list[CheckpointEntry]:
    """Load (and so validate) every checkpoint; keeps small models in memory. ``weights``: see :data:`WEIGHTS`."""
    from repa_probe.checkpoint import CheckpointError, load_model, safe_load
    from repa_probe.training.config import ConfigError, from_dict

    if weights not in WEIGHTS:
        raise AlignmentError(f"--weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    entries, labels = [], set()
    for p in paths:
        raw = safe_load(p)
        cfg, step = None, None
        if isinstance(raw, dict) and str(raw.get("format", "")).startswith("repa-probe/"):
            step = raw.get("step")
            try:
                cfg = from_dict(raw["config"]) if isinstance(raw.get("config"), dict) else None
            except (ConfigError, ValueError) as exc:
                raise CheckpointError(f"{p}: stored training config is invalid ({exc})") from None
            if cfg is None:
                raise CheckpointError(f"{p}: repa-probe checkpoint without a 'config' dict")
        model, info = load_model(p, family=family, prefer_ema=_use_ema(weights, cfg, step), loaded=raw)
        del raw
        if weights == "auto" and cfg is not None and not info.ema:
            log.info("%s: using the raw model weights (EMA decay %g has not warmed up after %s steps; "
                     "--weights ema to override)", p, cfg.train.ema_decay, step)
        in_run = p.parent.name == "checkpoints"
        run = p.parent.parent.name if in_run else None
        label = f"{run}/{p.stem}" if in_run else p.stem
        if label in labels:
            label = f"{label}#{len(entries)}"
        labels.add(label)
        keep = sum(q.numel() for q in model.parameters()) <= KEEP_MODEL_PARAMS
        entries.append(CheckpointEntry(p, label, run, info, cfg, model if keep else None))
    return entries


def objective_for(entry: CheckpointEntry):
    """Our checkpoints: the training objective; official DiT: DDPM (1000 steps); SiT/REPA: linear flow."""
    from repa_probe.objectives import FlowMatching, GaussianDiffusion

    if entry.cfg is not None:
        from repa_probe.training.builders import build_objective

        return build_objective(entry.cfg)
    if entry.info.family == "DiT":
        return GaussianDiffusion(1000, learn_sigma=bool(entry.info.config.get("learn_sigma", True)))
    return FlowMatching("linear")


# ----------------------------------------------------------------------------- data, encoder, VAE
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> cuda when available else cpu; a CUDA device that does not exist is an error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise AlignmentError(f"--device {device!r} is not a device (auto, cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AlignmentError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return dev


@dataclasses.dataclass
class Context:
    """What every checkpoint is compared on: the dataset (N samples), the target encoder and the VAE."""

    dataset: Any
    encoder: Any
    vae: Any
    target_kind: str
    labels: str
    info: dict

    def describe(self) -> dict:
        return dict(target_kind=self.target_kind, labels=self.labels, **self.info)


def agreed(entries, what: str, fields: Callable, error: type = None) -> Any:
    """The common value of ``fields(cfg)`` over our checkpoints, else ``error`` naming the option to pass."""
    values = {json.dumps(fields(e.cfg), sort_keys=True, default=str): e.label for e in entries}
    if len(values) > 1:
        raise (error or AlignmentError)(f"the checkpoints were trained with different {what} "
                                        f"({'; '.join(values)}); pass --{what} to analyse them on the same one")
    return fields(entries[0].cfg)


def build_config_encoder(cfg):
    """The training run's target encoder on the CPU, rebuilt exactly (random weights are seeded by
    ``run.seed`` alone, see :func:`repa_probe.training.builders.build_encoder`), also for a vanilla run."""
    from repa_probe.training.builders import build_encoder

    return build_encoder(cfg, torch.device("cpu"), required=True)


def build_analysis_dataset(name: str, root=None, split: str = "auto", resolution=None, seed: int = 0,
                           num_samples: int | None = None):
    """The dataset to analyse: ``split="auto"`` takes the held-out ``val`` split when the dataset has one,
    else ``train``. ``name`` may be a directory (``repa`` layout if it has ``images/``, else imagefolder).
    ``num_samples``: N (default min(10000, size); procedural shapes: 512); more than the dataset has is an
    error.
    Returns ``(dataset, split used)``."""
    from repa_probe.data import CappedDataset, DatasetError, build_dataset

    if Path(str(name)).is_dir():
        root, name = str(name), ("repa" if (Path(str(name)) / "images").is_dir() else "imagefolder")
    if name == "shapes" and num_samples is None:
        num_samples = DEFAULT_SHAPES_SAMPLES
    splits = ("val", "train") if split == "auto" else (split,)
    for i, sp in enumerate(splits):
        try:
            ds = build_dataset(name, root=root, split=sp, resolution=resolution, seed=seed,
                               num_samples=num_samples if name == "shapes" else None)
            break
        except DatasetError as exc:
            if i + 1 == len(splits):
                raise
            log.warning("dataset %s has no usable %r split (%s); using %r", name, sp, exc, splits[i + 1])
    size = len(ds)
    n = min(MAX_DEFAULT_SAMPLES, size) if num_samples is None else int(num_samples)
    if n > size:
        raise AlignmentError(f"--num-samples {n} is more than the {sp!r} split of {name} has ({size})")
    return (CappedDataset(ds, n) if n < size else ds), sp


def resolve_context(entries: Sequence[CheckpointEntry], data=None, data_root=None, split: str = "auto",
                    encoder=None, encoder_weights=None, random_encoder: bool = False, target_kind: str = "cls",
                    vae=None, labels: str = "null", family=None, num_samples=None, seed: int = 0) -> Context:
    """Dataset, target encoder and VAE shared by all checkpoints: from the options, else from our
    checkpoints' training config (which must agree). Validates compatibility; loads nothing heavy."""
    from repa_probe.analysis.features import LABEL_MODES
    from repa_probe.encoders.vae import load_vae

    if target_kind not in TARGET_KINDS:
        raise AlignmentError(f"--target-kind must be one of {', '.join(TARGET_KINDS)}, got {target_kind!r}")
    if labels not in LABEL_MODES:
        raise AlignmentError(f"--labels must be one of {', '.join(LABEL_MODES)}, got {labels!r}")
    ours = [e for e in entries if e.cfg is not None]
    official = [e.label for e in entries if e.cfg is None]
    if official and (data is None or encoder is None):
        raise AlignmentError(f"official checkpoint(s) {', '.join(official)} store no training config: pass --data "
                             "and --encoder")
    first = entries[0].info.config
    if vae is None:
        vae = agreed(ours, "vae", lambda c: c.vae.name) if ours else ("stabilityai/sd-vae-ft-ema"
                                                                         if first["in_channels"] == 4 else "none")
    vae_model = load_vae(vae)
    factor = vae_model.downsample_factor if vae_model is not None else 1
    channels = vae_model.latent_channels if vae_model is not None else 3
    if data is None:
        d = agreed(ours, "data", lambda c: dict(name=c.data.name, root=c.data.root, res=c.data.resolution,
                                                 seed=c.run.seed))
        data, data_root, resolution, data_seed = d["name"], d["root"], d["res"], d["seed"]
    else:
        resolution = ours[0].cfg.data.resolution if ours else first["input_size"] * factor
        data_seed = seed
    for e in entries:
        c = e.info.config
        if (c["in_channels"], c["input_size"]) != (channels, resolution // factor):
            raise AlignmentError(f"{e.label}: model takes {c['in_channels']}x{c['input_size']}^2 inputs but the "
                                 f"data is {channels}x{resolution // factor}^2 ({resolution}px, vae {vae}); "
                                 "check --vae / --data")
    dataset, used_split = build_analysis_dataset(data, data_root, split, resolution, data_seed, num_samples)
    n_cls = getattr(dataset, "num_classes", None)
    for e in entries:
        c = e.info.config
        if labels == "null" and c["class_dropout_prob"] <= 0:
            raise AlignmentError(f"{e.label}: the model has no null class; use --labels true")
        if labels == "true" and (n_cls is None or n_cls > c["num_classes"]):
            raise AlignmentError(f"{e.label}: dataset has {n_cls} classes, the model {c['num_classes']}; "
                                 "use --labels null")
    if encoder is None:
        agreed(ours, "encoder", lambda c: dict(name=c.encoder.name, weights=c.encoder.weights,
                                                pretrained=c.encoder.pretrained, source=c.encoder.source,
                                                size=c.encoder.input_size, seed=c.run.seed))
        enc = build_config_encoder(ours[0].cfg)
    else:
        from repa_probe.encoders.target import load_encoder

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            enc = load_encoder(encoder, weights=encoder_weights, pretrained=not random_encoder, resolution=resolution)
    info = dict(data=str(data), data_root=data_root, split=used_split, resolution=resolution, vae=str(vae),
                encoder_name=enc.name)
    return Context(dataset, enc, vae_model, target_kind, labels, info)


def meta_model(entry: CheckpointEntry):
    from repa_probe.models import DiffusionTransformer

    with torch.device("meta"):
        return DiffusionTransformer(**entry.info.config)


def reload_model(entry: CheckpointEntry):
    from repa_probe.checkpoint import load_model

    return load_model(entry.path, family=entry.info.family, prefer_ema=entry.info.ema)[0]
