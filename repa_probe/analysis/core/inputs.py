"""The one resolver of analysis inputs: checkpoints, objective, data, VAE and target encoder.

Works for our checkpoints (everything comes from the stored training config unless an option overrides it;
several checkpoints must agree) and for official DiT / SiT / REPA files (which store no config: ``--data``
and, where an encoder is needed, ``--encoder`` are required). Everything here validates and loads; nothing
computes features. Errors are one-line :class:`AnalysisInputError` (or the loaders' own CheckpointError,
EncoderWeightsError, VAEWeightsError, DatasetError).

- :func:`load_checkpoints` -> :class:`CheckpointEntry` per file (model, objective, training config);
- :func:`check_times_and_layers` -> the blocks of each checkpoint, after checking times and layers fit it;
- :func:`resolve_source` -> :class:`DataSource` (dataset name/root/resolution/seed and the VAE), checked
  against every model's input; :func:`build_analysis_dataset` builds one split of it;
- :func:`resolve_encoder` -> the target encoder (``--encoder``, else the training config's).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from repa_probe.analysis.core.features import check_labels_fit, resolve_layers
from repa_probe.analysis.core.paths import checkpoint_paths
from repa_probe.analysis.errors import AnalysisInputError
from repa_probe.checkpoint import CheckpointError, load_model, safe_load
from repa_probe.data import CappedDataset, DatasetError, build_dataset
from repa_probe.encoders.target import load_encoder
from repa_probe.encoders.vae import default_vae
from repa_probe.models import from_config
from repa_probe.trained_vae import checkpoint_vae, load_any_vae
from repa_probe.objectives import FlowMatching, GaussianDiffusion
from repa_probe.timesteps import DDPM_STEPS, TimeError, process_time
from repa_probe.training.builders import build_encoder, build_objective
from repa_probe.training.config import ConfigError, from_dict
from repa_probe.training.rundir import checkpoint_label, checkpoint_run

log = logging.getLogger("repa_probe")

#: default sizes of the procedural ``shapes`` data in the analyses (it has no natural size): alignment
#: N (enough for k = 10 CKNNA, fast on a CPU) and the probes' train / test splits
SHAPES_SIZES = {"alignment": 512, "train": 2000, "test": 500}
PROCEDURAL_MAX = 50_000  # the largest procedural shapes set an analysis draws (more would run for hours)
MAX_DEFAULT_SAMPLES = 10000  # alignment N when --num-samples is not given (min with the dataset size)
KEEP_MODEL_PARAMS = 50_000_000  # models this small stay in memory between validation and analysis


# -------------------------------------------------------------------------------------- checkpoints
@dataclasses.dataclass
class CheckpointEntry:
    """One checkpoint to analyse, and the one owner of what it needs to be fed and decoded.

    ``label`` (short unique name, :func:`~repa_probe.training.rundir.checkpoint_label`), ``run`` (run
    directory name or None; never recovered by splitting ``label``), ``info``
    (:class:`~repa_probe.checkpoint.ModelInfo`), ``cfg`` (training Config, None for official files),
    ``objective`` (FlowMatching / GaussianDiffusion), ``model`` (kept in memory when small), ``vae_name``
    (``--vae``, else the run's ``vae.name``, else :func:`~repa_probe.encoders.vae.default_vae` of the latent
    channels; ``"none"`` in pixel space) and ``vae`` (the loaded LatentVAE or None, shared by entries of one
    name). Read from the model and the VAE (never constants; REPA-E / VA-VAE latents are 32 x f16):

    - ``latent_channels``: C of the model input ``(B, C, h, h)`` (3 in pixel space);
    - ``latent_size``: h, the model's input side;
    - ``downsample_factor``: f of the VAE (1 in pixel space);
    - ``resolution``: pixel side of the images, ``h * f``.
    """

    path: Path
    label: str
    run: str | None
    info: Any
    cfg: Any
    objective: Any
    model: Any = None
    vae_name: str = "none"
    vae: Any = None

    @property
    def latent_channels(self) -> int:
        return int(self.info.config["in_channels"])

    @property
    def latent_size(self) -> int:
        return int(self.info.config["input_size"])

    @property
    def downsample_factor(self) -> int:
        return int(self.vae.downsample_factor) if self.vae is not None else 1

    @property
    def resolution(self) -> int:
        return self.latent_size * self.downsample_factor

    def take_model(self):
        """The model (float32, CPU, eval): the one kept from validation, else loaded again. The entry forgets
        it, so the caller's reference is the last one and ``del`` frees it."""
        model, self.model = self.model, None
        if model is None:
            model = load_model(self.path, time_convention=self.info.time_convention, prefer_ema=self.info.ema,
                               encoder_depth=None if self.cfg is not None else self.info.config["encoder_depth"])[0]
        return model.eval()

    def meta_model(self):
        """The architecture on the meta device (shapes only, no memory)."""
        if self.model is not None:
            return self.model
        with torch.device("meta"):
            return from_config(self.info.config)

    def describe(self) -> dict:
        """What ``summary.json`` says about the checkpoint."""
        i = self.info
        return dict(label=self.label, path=str(self.path), run=self.run, step=i.step, family=i.family,
                    time_convention=i.time_convention, source_format=i.source_format,
                    weights="ema" if i.ema else "model", depth=i.config["depth"], objective=repr(self.objective),
                    vae=self.vae_name, resolution=self.resolution, latent_channels=self.latent_channels,
                    downsample_factor=self.downsample_factor)


def _use_ema(weights: str, cfg, step) -> bool:
    """``auto``: the EMA unless it still weighs the initial weights by more than half (ema_decay**step > 0.5,
    e.g. fewer than ~6900 steps at decay 0.9999), in which case the raw model weights are used."""
    if weights != "auto":
        return weights == "ema"
    if cfg is None or step is None:
        return True
    return float(cfg.train.ema_decay) ** int(step) <= 0.5


def _training_config(path: Path, raw) -> tuple[Any, Any]:
    """``(Config, step)`` of our checkpoint, ``(None, None)`` for an official file."""
    if not (isinstance(raw, dict) and str(raw.get("format", "")).startswith("repa-probe/")):
        return None, None
    if not isinstance(raw.get("config"), dict):
        raise CheckpointError(f"{path}: repa-probe checkpoint without a 'config' dict")
    try:
        return from_dict(raw["config"]), raw.get("step")
    except (ConfigError, ValueError) as exc:
        raise CheckpointError(f"{path}: stored training config is invalid ({exc})") from None


def objective_for(cfg, info):
    """Our checkpoints: the training objective; official ``ddpm`` (DiT): DDPM, 1000 steps; others: linear flow."""
    if cfg is not None:
        return build_objective(cfg)
    if info.time_convention == "ddpm":
        return GaussianDiffusion(1000, learn_sigma=bool(info.config.get("learn_sigma", True)))
    return FlowMatching("linear")


def _load(path: Path, raw, cfg, options, prefer_ema: bool):
    """``load_model`` of one file. ``options.time_convention`` applies where the file cannot tell: a plain state
    dict whose shapes read as DiT (a plain official SiT file looks the same); our files, training files with
    args and REPA state dicts (projectors, C-channel output) keep the convention they show.
    ``options.encoder_depth`` applies to official files (ours store it)."""
    kw = dict(prefer_ema=prefer_ema, loaded=raw, encoder_depth=options.encoder_depth if cfg is None else None)
    model, info = load_model(path, **kw)
    forced = options.time_convention
    if forced is None or forced == info.time_convention:
        return model, info
    if info.source_format == "official-state-dict" and info.time_convention == "ddpm":
        return load_model(path, time_convention=forced, **kw)
    log.info("%s: reading time as %r, which the file shows (--time-convention %s applies to plain state dicts "
             "that look like DiT)", path, info.time_convention, forced)
    return model, info


def _assign_vaes(entries: list[CheckpointEntry], options) -> None:
    """Each entry's ``vae_name`` and ``vae``: ``--vae``, else the run's ``vae.name``; a file without a training
    config takes the VAE of the first of our runs with as many latent channels, else
    :func:`~repa_probe.encoders.vae.default_vae` of its channels. Each VAE is loaded once. A model with REPA-E's
    latent BatchNorm gets its own: the VAE its checkpoint holds (end-to-end tuned; else the named one),
    normalised by the BatchNorm statistics of the weights analysed (:func:`repa_probe.trained_vae.checkpoint_vae`)."""
    ours = {e.latent_channels: e.cfg.vae.name for e in reversed(entries) if e.cfg is not None}
    vaes: dict = {}
    for e in entries:
        given = getattr(options, "vae", None)
        if given is not None:
            e.vae_name = str(given)
        elif e.cfg is not None:
            e.vae_name = str(e.cfg.vae.name)
        else:
            e.vae_name = str(ours.get(e.latent_channels) or default_vae(e.latent_channels))
        if e.info.config.get("bn_momentum") is not None or (e.cfg is not None and e.cfg.vae.tune):
            # REPA-E: the checkpoint's own (tuned) VAE unless --vae names one, normalised by its model's
            # BatchNorm statistics (the weights analysed: EMA or raw)
            e.vae = checkpoint_vae(e.path, e.vae_name, prefer_ema=e.info.ema, tuned=given is None)
            e.vae_name = e.vae.name if given is None and e.vae is not None else e.vae_name
            continue
        if e.vae_name not in vaes:
            vaes[e.vae_name] = load_any_vae(e.vae_name)
        e.vae = vaes[e.vae_name]


def load_checkpoints(items: Sequence, options) -> list[CheckpointEntry]:
    """Load (and so validate) every checkpoint of ``items`` (files or run directories) and the VAE each needs
    (:func:`_assign_vaes`); small models stay in memory. ``options``: ``weights``, ``time_convention``,
    ``encoder_depth`` (official files only: ours store their depth) and ``vae`` (when the options have it)
    of :class:`~repa_probe.analysis.core.options.AnalysisOptions`."""
    entries, labels = [], set()
    for p in checkpoint_paths(items):
        raw = safe_load(p)
        cfg, step = _training_config(p, raw)
        model, info = _load(p, raw, cfg, options, prefer_ema=_use_ema(options.weights, cfg, step))
        del raw
        if options.weights == "auto" and cfg is not None and not info.ema:
            log.info("%s: using the raw model weights (EMA decay %g has not warmed up after %s steps; "
                     "--weights ema to override)", p, cfg.train.ema_decay, step)
        label = checkpoint_label(p)
        if label in labels:
            label = f"{label}#{len(entries)}"
        labels.add(label)
        keep = sum(q.numel() for q in model.parameters()) <= KEEP_MODEL_PARAMS
        entries.append(CheckpointEntry(p, label, checkpoint_run(p), info, cfg, objective_for(cfg, info),
                                       model if keep else None))
    _assign_vaes(entries, options)
    return entries


def check_times_and_layers(entries: Sequence[CheckpointEntry], options) -> dict[str, list[int]]:
    """The 1-based blocks of each checkpoint (label -> list), after checking that ``options.timesteps`` fit
    its time convention and ``options.layers`` its depth."""
    out = {}
    for e in entries:
        try:
            process_time(options.timesteps, e.info.time_convention,
                         getattr(e.objective, "num_timesteps", DDPM_STEPS))
            out[e.label] = resolve_layers(e.meta_model(), options.layers)
        except (TimeError, AnalysisInputError) as exc:
            raise AnalysisInputError(f"{e.label}: {exc}") from None
    return out


# ----------------------------------------------------------------------------- data, encoder, VAE
def agreed(entries: Sequence[CheckpointEntry], what: str, fields: Callable) -> Any:
    """The common value of ``fields(cfg)`` over our checkpoints, else an error naming the option to pass."""
    values = {json.dumps(fields(e.cfg), sort_keys=True, default=str): e.label for e in entries}
    if len(values) > 1:
        raise AnalysisInputError(f"the checkpoints were trained with different {what} ({'; '.join(values)}); "
                                 f"pass --{what} to analyse them on the same one")
    return fields(entries[0].cfg)


@dataclasses.dataclass
class DataSource:
    """What every checkpoint is fed: dataset ``name`` / ``root``, image side ``resolution``, dataset ``seed``,
    ``classes`` (shapes' class count, else None), the VAE (``vae_name``; ``vae`` a LatentVAE or None for
    pixels) and whether it came from the training config (``from_config``)."""

    name: str
    root: str | None
    resolution: int
    seed: int
    classes: int | None
    vae_name: str
    vae: Any
    from_config: bool

    @property
    def info(self) -> dict:
        return dict(data=self.name, data_root=self.root, resolution=self.resolution, data_seed=self.seed,
                    vae=self.vae_name)


def _official_need(entries, options, need_encoder: bool) -> None:
    official = [e.label for e in entries if e.cfg is None]
    missing = [f for f, v in (("--data", options.data), ("--encoder", options.encoder if need_encoder else 1))
               if v is None]
    if official and missing:
        raise AnalysisInputError(f"official checkpoint(s) {', '.join(official)} store no training config: pass "
                                 f"{' and '.join(missing)}")


def resolve_source(entries: Sequence[CheckpointEntry], options, need_encoder: bool = False) -> DataSource:
    """Dataset and VAE shared by all checkpoints: from ``options`` (``data``, ``data_root``, ``vae``, ``seed``),
    else from our checkpoints' training config (which must agree). Checks that every model takes the data's
    channels and size, and has a null class when ``options.labels`` is null. Loads the VAE only."""
    _official_need(entries, options, need_encoder)
    ours = [e for e in entries if e.cfg is not None]
    if options.vae is None and ours:
        agreed(ours, "vae", lambda c: c.vae.name)
    first = (ours or entries)[0]  # --vae applies to every entry; else our runs agree, else the first file's
    if options.data is None:
        d = agreed(ours, "data", lambda c: dict(name=c.data.name, root=c.data.root, res=c.data.resolution,
                                                 seed=c.run.seed, classes=c.data.num_classes))
        source = DataSource(d["name"], d["root"], d["res"], d["seed"],
                            d["classes"] if d["name"] == "shapes" else None, first.vae_name, first.vae, True)
    else:
        source = DataSource(str(options.data), options.data_root, first.resolution, options.seed, None,
                            first.vae_name, first.vae, False)
    check_models_fit(entries, source, options.labels)
    return source


def check_models_fit(entries: Sequence[CheckpointEntry], source: DataSource, labels: str = "null") -> None:
    """Every model takes the source's channels x size, and has a null class when ``labels`` is null."""
    factor = source.vae.downsample_factor if source.vae is not None else 1
    channels = source.vae.latent_channels if source.vae is not None else 3
    size = source.resolution // factor
    for e in entries:
        c = e.info.config
        if (c["in_channels"], c["input_size"]) != (channels, size):
            raise AnalysisInputError(f"{e.label}: model takes {c['in_channels']}x{c['input_size']}^2 inputs but the "
                                     f"data is {channels}x{size}^2 ({source.resolution}px, vae {source.vae_name}); "
                                     "check --vae / --data")
    if labels == "null":
        check_class_labels(entries, labels, None)


def check_class_labels(entries: Sequence[CheckpointEntry], labels: str, num_classes: int | None) -> None:
    """Every model fits ``labels`` (:func:`~repa_probe.analysis.core.features.check_labels_fit`) on a dataset of
    ``num_classes`` classes (None: unlabelled)."""
    for e in entries:
        c = e.info.config
        try:
            check_labels_fit(c["num_classes"], c.get("class_dropout_prob", 0) > 0, labels, num_classes)
        except AnalysisInputError as exc:
            raise AnalysisInputError(f"{e.label}: {exc}") from None


def build_config_encoder(cfg):
    """The training run's target encoder on the CPU, rebuilt exactly (random weights are seeded by
    ``run.seed`` alone, see :func:`repa_probe.training.builders.build_encoder`), also for a vanilla run."""
    return build_encoder(cfg, torch.device("cpu"), required=True)


def encoder_fields(cfg) -> dict:
    """What makes a training config's target encoder the same as another's."""
    return dict(name=cfg.encoder.name, weights=cfg.encoder.weights, pretrained=cfg.encoder.pretrained,
                source=cfg.encoder.source, size=cfg.encoder.input_size, seed=cfg.run.seed)


def resolve_encoder(entries: Sequence[CheckpointEntry], options, resolution: int):
    """The target encoder on the CPU: ``options.encoder`` (weights ``encoder_weights``, random with
    ``random_encoder`` seeded by ``seed``) when given, else the training config's (must agree)."""
    if options.encoder is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(options.seed)
            return load_encoder(options.encoder, weights=options.encoder_weights,
                                pretrained=not options.random_encoder, resolution=resolution)
    ours = [e for e in entries if e.cfg is not None]
    if not ours:
        raise AnalysisInputError("official checkpoints store no target encoder: pass --encoder NAME")
    agreed(ours, "encoder", encoder_fields)
    return build_config_encoder(ours[0].cfg)


def procedural_size(num: int | None, default: int, option: str) -> int:
    """Images of a procedural (shapes) dataset: ``num`` or ``default``, at most :data:`PROCEDURAL_MAX`."""
    n = default if num is None else int(num)
    if n > PROCEDURAL_MAX:
        raise AnalysisInputError(f"{option} {n}: the procedural shapes data is capped at {PROCEDURAL_MAX} images "
                                 f"(more would run for hours and hold every image in memory); lower {option}")
    return n


def build_analysis_dataset(source: DataSource, split: str = "auto", num_samples: int | None = None):
    """One split of ``source``: ``split="auto"`` takes the held-out ``val`` split when the dataset has one,
    else ``train``. ``source.name`` may be a directory (``repa`` layout if it has ``images/``, else
    imagefolder). ``num_samples``: N (default min(10000, size); shapes :data:`SHAPES_SIZES`); more than the
    split has is an error. Returns ``(dataset, split used)``."""
    name, root = source.name, source.root
    if Path(name).is_dir():
        root, name = name, ("repa" if (Path(name) / "images").is_dir() else "imagefolder")
    extra = {}
    if name == "shapes":
        extra = dict(num_samples=procedural_size(num_samples, SHAPES_SIZES["alignment"], "--num-samples"))
        extra.update({"num_classes": source.classes} if source.classes is not None else {})
    splits = ("val", "train") if split == "auto" else (split,)
    for i, sp in enumerate(splits):
        try:
            ds = build_dataset(name, root=root, split=sp, resolution=source.resolution, seed=source.seed, **extra)
            break
        except DatasetError as exc:
            if i + 1 == len(splits):
                raise
            log.warning("dataset %s has no usable %r split (%s); using %r", name, sp, exc, splits[i + 1])
    size = len(ds)
    n = min(MAX_DEFAULT_SAMPLES, size) if num_samples is None else int(num_samples)
    if n > size:
        raise AnalysisInputError(f"--num-samples {n} is more than the {sp!r} split of {name} has ({size})")
    return (CappedDataset(ds, n) if n < size else ds), sp
