"""Options of sampling (:class:`SampleOptions`) and of FID evaluation (:class:`FidOptions`), typed like the
other analyses' (:mod:`repa_probe.analysis.core.options`): each field is the flag of the same name, checked
once when the object is built (non-finite numbers, 0 and negatives refused where they mean nothing, one line
naming the flag), written to ``options.json``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from repa_probe.analysis.core.options import (Options, OptionsError, _choice, _float, _int, _replicates,
                                              validate_checkpoint_options)

SAMPLE_LABELS = ("balanced", "random")
SAMPLE_METHODS = ("euler", "heun", "sde", "ddpm", "ddim")


def parse_cfg_channels(value) -> str | int:
    """``--cfg-channels``: ``auto``, ``all`` or a channel count k >= 1 (the first k channels are guided)."""
    if value in ("auto", "all"):
        return value
    return _int("cfg_channels", value)


@dataclasses.dataclass
class SampleOptions(Options):
    """Sampling checkpoints to folders (``python -m analysis.sample``).

    Checkpoints: ``weights``, ``time_convention``, ``encoder_depth`` (as every analysis), ``vae`` (decoder;
    default the run's, else the default of the model's latent channels). Sampler: ``num_samples`` (required
    to sample), ``method`` / ``steps`` (default per model: euler 50 for flow models, ddpm 250 for DiT),
    ``cfg_scale`` (w, 1 = off), ``guidance_low`` / ``guidance_high`` (interval in REPA time, within [0, 1]),
    ``cfg_channels``, ``cls_cfg_scale`` (REG models: the class token's guidance; None = ``cfg_scale``, <= 0 =
    its conditional velocity), ``timestep_shift`` (LightningDiT's shifted euler / heun grid, 0 = off),
    ``labels`` (balanced | random), ``seed``. Running: ``batch_size``, ``device``,
    ``progress``.
    """

    weights: str = "auto"
    time_convention: str | None = None
    encoder_depth: int | None = None
    vae: str | None = None
    num_samples: int | None = None
    method: str | None = None
    steps: int | None = None
    cfg_scale: float = 1.0
    guidance_low: float = 0.0
    guidance_high: float = 1.0
    cfg_channels: Any = "auto"
    cls_cfg_scale: float | None = None
    timestep_shift: float = 0.0
    labels: str = "balanced"
    seed: int = 0
    batch_size: int = 256
    device: str = "auto"
    progress: bool = True

    #: the fewest samples that mean something (FID needs 2 for a covariance)
    min_samples = 1

    def validate(self) -> None:
        validate_checkpoint_options(self)
        self.num_samples = _int("num_samples", self.num_samples, minimum=self.min_samples, optional=True)
        if self.method is not None:
            _choice("method", self.method, SAMPLE_METHODS)
        self.steps = _int("steps", self.steps, optional=True)
        self.cfg_scale = _float("cfg_scale", self.cfg_scale)
        self.guidance_low = _float("guidance_low", self.guidance_low, 0.0, 1.0)
        self.guidance_high = _float("guidance_high", self.guidance_high, 0.0, 1.0)
        if self.guidance_low > self.guidance_high:
            raise OptionsError(f"--guidance-low {self.guidance_low} is above --guidance-high {self.guidance_high}: "
                               "the guidance interval is empty")
        self.cfg_channels = parse_cfg_channels(self.cfg_channels)
        self.cls_cfg_scale = _float("cls_cfg_scale", self.cls_cfg_scale, optional=True)
        self.timestep_shift = _float("timestep_shift", self.timestep_shift, minimum=0.0)
        _choice("labels", self.labels, SAMPLE_LABELS)
        self.seed = _int("seed", self.seed, minimum=0)
        self.batch_size = _int("batch_size", self.batch_size)

    def need_num_samples(self) -> int:
        if self.num_samples is None:
            raise OptionsError("--num-samples is required (50000 for FID-50K)")
        return self.num_samples


@dataclasses.dataclass
class FidOptions(SampleOptions):
    """FID / FD / IS / KID / precision-recall of samples (``python -m analysis.fid``): the sampler's options
    (used with checkpoints; ``num_samples`` defaults to the reference size for our runs' own data, else
    50000) plus ``samples`` (existing folders / ``.npz`` to evaluate instead of checkpoints), ``ref``,
    ``inception_weights`` (enables ``fid_inception``; ``isc``, ``kid``, ``prc`` need it), ``fd_dinov2`` /
    ``dinov2_weights``, ``encoder`` / ``encoder_weights`` / ``random_encoder`` (FD in a target encoder's space),
    ``bootstrap`` (replicates of each Fréchet distance over the samples, 0 = off).
    """

    samples: Any = None
    ref: str | None = None
    inception_weights: str | None = None
    isc: bool = False
    kid: bool = False
    prc: bool = False
    fd_dinov2: bool = False
    dinov2_weights: str | None = None
    encoder: str | None = None
    encoder_weights: str | None = None
    random_encoder: bool = False
    bootstrap: int = 0

    min_samples = 2

    def validate(self) -> None:
        super().validate()
        if self.samples is not None:
            self.samples = [str(s) for s in ([self.samples] if isinstance(self.samples, str) else self.samples)]
            if not self.samples:
                self.samples = None
        self.bootstrap = _replicates(self.bootstrap)
        if (self.isc or self.kid or self.prc) and not self.inception_weights:
            raise OptionsError("--isc/--kid/--prc use Inception features: pass --inception-weights FILE")
        if self.random_encoder and not self.encoder:
            raise OptionsError("--random-encoder needs --encoder NAME (the architecture to initialise)")
