"""Options of the analyses as typed dataclasses (the analysis counterpart of the training config).

:class:`AnalysisOptions` holds what every analysis of checkpoints shares (which weights, which data,
encoder and VAE, which blocks and times, where to run); each analysis extends it with its own fields
(:class:`AlignmentOptions`, :class:`ProbeOptions`; a new analysis adds ``class FooOptions(AnalysisOptions)``).
Every field is named after its command-line flag (``batch_size`` <-> ``--batch-size``), so a CLI fills
the options with :meth:`AnalysisOptions.from_namespace` and a library user with keywords or
:meth:`AnalysisOptions.from_dict`. Values are checked and normalised when the object is built
(``"0,0.5"`` -> ``[0.0, 0.5]``, ``"1,4"`` -> ``[1, 4]``); a bad value is a one-line :class:`OptionsError`
naming the flag. :meth:`to_dict` is what an analysis writes to ``options.json``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import numbers
from typing import Any, Sequence

from repa_probe.analysis.errors import OptionsError
from repa_probe.analysis.metrics.spatial import SPATIAL_METRICS
from repa_probe.analysis.probes.linear import BACKENDS
from repa_probe.data.common import SPLITS
from repa_probe.timesteps import TimeError, UserTime, as_float, convention_of, label, parse_time, parse_times

WEIGHTS = ("auto", "ema", "model")
SPLIT_CHOICES = ("auto", *SPLITS)  # a dataset split, or "auto": val when the dataset has one, else train
LABEL_MODES = ("null", "true")
METRICS = ("cknna", "mutual_knn", "cka", "unbiased_cka", "cycle_knn")
TARGET_KINDS = ("cls", "mean_patch")
FIGURE_SETS = ("summary", "all", "none")
TASKS = ("linear", "segmentation")

log = logging.getLogger("repa_probe")


def flag(name: str) -> str:
    """The command-line flag of a field: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def _choice(name: str, value, choices: Sequence) -> Any:
    if value not in choices:
        raise OptionsError(f"{flag(name)} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def _int(name: str, value, minimum: int = 1, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise OptionsError(f"{flag(name)} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _float(name: str, value, minimum: float | None = None, maximum: float | None = None,
           optional: bool = False) -> float | None:
    """A finite number (NaN and infinities refused) within ``[minimum, maximum]``, as float."""
    if value is None and optional:
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    bad = isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
        or (minimum is not None and value < minimum) or (maximum is not None and value > maximum)
    if bad:
        bounds = " in [{}, {}]".format(minimum, maximum) if minimum is not None and maximum is not None else \
            f" >= {minimum}" if minimum is not None else f" <= {maximum}" if maximum is not None else ""
        raise OptionsError(f"{flag(name)} must be a finite number{bounds}, got {value!r}")
    return float(value)
def _replicates(value) -> int:
    """``--bootstrap``: 0 (off) or at least 2 replicates."""
    value = _int("bootstrap", value, minimum=0)
    if value == 1:
        raise OptionsError("--bootstrap must be 0 (off) or >= 2 replicates, got 1")
    return value


def parse_layers(value) -> str | list[int]:
    """``"all"`` / None or 1-based block numbers (``"1,4,8"`` or a list), ``latent`` (= 0: the clean latent
    tokens) among them -> ``"all"`` or a sorted unique list."""
    if value is None or value == "all":
        return "all"
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    words = [str(v).strip() for v in items if str(v).strip()]
    try:
        given = [0 if w == "latent" else int(w) for w in words]
    except ValueError:
        given = []
    out = sorted(set(given))
    lowest = 0 if isinstance(value, (list, tuple)) else 1  # 0 is written 'latent' (lists: options.json)
    if not out or out[0] < min(lowest, 0 if "latent" in words else 1):
        raise OptionsError(f"--layers must be 'all' or 1-based block numbers like 1,4,8 (and 'latent': the clean "
                           f"latent tokens), got {value!r}")
    _say_merged("--layers", given, out)
    return out


def _say_merged(option: str, given: list, kept: list) -> None:
    """Warn when ``given`` named a value twice (each is computed once: ``kept``)."""
    if len(kept) < len(given):
        twice = sorted({str(v) for v in given if given.count(v) > 1})
        log.warning("%s: %s given more than once; each is computed once", option, ", ".join(twice))


def parse_metrics(value) -> list[str]:
    """``"cknna,lds"`` or a list -> list of metric names (each one of :data:`METRICS` or the spatial-structure
    metrics :data:`~repa_probe.analysis.metrics.spatial.SPATIAL_METRICS`)."""
    names = [n.strip() for n in (value.split(",") if isinstance(value, str) else list(value)) if n.strip()]
    known = METRICS + SPATIAL_METRICS
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise OptionsError(f"--metric: unknown metric(s) {bad or value!r}; choose from {', '.join(known)}")
    return names


def _positive_floats(name: str, value) -> list[float] | None:
    """None, or a comma list / sequence of numbers > 0 (``"0.01,0.1"`` -> ``[0.01, 0.1]``)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    try:
        out = [float(str(v).strip()) for v in items if str(v).strip()]
    except ValueError:
        out = []
    if not out or not all(math.isfinite(v) and v > 0 for v in out):
        raise OptionsError(f"{flag(name)} must be numbers > 0 (comma list like 0.01,0.1), got {value!r}")
    return out


def _times(name: str, value) -> list[UserTime]:
    """Parsed times in the order given; a time named twice (``0.5,0.50``) is kept once, with a warning."""
    try:
        given = parse_times(value, flag(name))
    except TimeError as exc:
        raise OptionsError(str(exc)) from None
    kept = list(dict.fromkeys(given))
    _say_merged(flag(name), given, kept)
    return kept


def validate_checkpoint_options(options) -> None:
    """The checkpoint fields every options class shares (``weights``, ``time_convention``, ``encoder_depth``),
    checked and normalised in place."""
    _choice("weights", options.weights, WEIGHTS)
    if options.time_convention is not None:
        try:
            options.time_convention = convention_of(options.time_convention)
        except TimeError as exc:
            raise OptionsError(f"--time-convention: {exc}") from None
    options.encoder_depth = _int("encoder_depth", options.encoder_depth, optional=True)


class Options:
    """Base of the options dataclasses: every field is the flag of the same name, validated and normalised in
    :meth:`validate` when the object is built; built from a dict (unknown keys refused) or an argparse
    namespace; :meth:`to_dict` is what ``options.json`` holds."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check and normalise every field in place (:class:`OptionsError` naming the flag)."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict, **overrides):
        """Options from a plain dict (``options.json``, a sweep); an unknown key is an :class:`OptionsError`."""
        values = {**values, **overrides}
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise OptionsError(f"unknown option(s) {', '.join(unknown)} for {cls.__name__}; valid: "
                               f"{', '.join(cls.field_names())}")
        return cls(**values)

    @classmethod
    def from_namespace(cls, args, **overrides):
        """Options from an argparse namespace: every attribute named like a field, then ``overrides``."""
        values = {k: getattr(args, k) for k in cls.field_names() if hasattr(args, k)}
        return cls.from_dict(values, **overrides)

    def replace(self, **changes):
        """A validated copy with ``changes``."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain JSON-able dict (times as table labels: floats or ``"step:N"``)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key, value in out.items():
            if key == "timesteps":
                out[key] = [label(t) for t in value]
            elif key.endswith("timestep") and value is not None:
                out[key] = label(value)
            elif isinstance(value, (list, tuple)):
                out[key] = list(value)
        return out


@dataclasses.dataclass
class AnalysisOptions(Options):
    """Options shared by every analysis of checkpoints (each field is the flag of the same name).

    Checkpoints: ``weights`` (auto: the EMA once ``ema_decay**step <= 0.5``, else the raw weights),
    ``time_convention`` (repa | sit | ddpm, or a family name REPA | SiT | DiT: for plain official state dicts
    whose shapes read as DiT, e.g. an official SiT file), ``encoder_depth`` (REPA projector block of plain official REPA state dicts).
    Data: ``data`` / ``data_root`` / ``split`` (default: the training config's dataset, held-out split),
    ``vae``, ``labels`` (class fed to the model: null = unconditional). Encoder: ``encoder`` /
    ``encoder_weights`` / ``random_encoder`` (default: the training config's). What: ``layers`` (1-based
    blocks or "all"), ``timesteps`` (user times, :mod:`repa_probe.timesteps`). Running: ``seed`` (noise),
    ``batch_size``, ``device``, ``cache_dir`` (encoder features; None = no cache), ``progress``.
    """

    weights: str = "auto"
    time_convention: str | None = None
    encoder_depth: int | None = None
    data: str | None = None
    data_root: str | None = None
    split: str = "auto"
    vae: str | None = None
    labels: str = "null"
    encoder: str | None = None
    encoder_weights: str | None = None
    random_encoder: bool = False
    layers: Any = "all"
    timesteps: Any = (0.0, 0.25, 0.5, 0.75, 1.0)
    seed: int = 0
    batch_size: int = 64
    device: str = "auto"
    cache_dir: str | None = None
    progress: bool = True

    def validate(self) -> None:
        """Check and normalise every field in place; :class:`OptionsError` naming the flag on a bad value."""
        validate_checkpoint_options(self)
        _choice("split", self.split, SPLIT_CHOICES)
        _choice("labels", self.labels, LABEL_MODES)
        self.layers = parse_layers(self.layers)
        self.timesteps = _times("timesteps", self.timesteps)
        self.seed = _int("seed", self.seed, minimum=0)
        self.batch_size = _int("batch_size", self.batch_size)
        if self.random_encoder and self.encoder is None:
            raise OptionsError("--random-encoder needs --encoder NAME (the architecture to initialise)")


@dataclasses.dataclass
class AlignmentOptions(AnalysisOptions):
    """:class:`AnalysisOptions` plus the alignment's own: ``num_samples`` (N images; default min(10000, size),
    procedural shapes 512), ``target_kind`` (cls | mean_patch), ``metric`` (names of :data:`METRICS` and of the spatial metrics), ``topk``
    (k of the kNN metrics), ``bootstrap`` (half-sampling replicates for 95% intervals, 0 = off),
    ``plot_timestep`` (time of the cross-checkpoint figures; default: the one nearest 0.5), ``figures``
    (summary: per metric the checkpoints compared and the training curves; all: also per checkpoint
    heatmaps and by-layer plots; none)."""

    batch_size: int = 256
    num_samples: int | None = None
    target_kind: str = "cls"
    metric: Any = ("cknna",)
    topk: int = 10
    bootstrap: int = 0
    plot_timestep: Any = None
    figures: str = "summary"

    def validate(self) -> None:
        super().validate()
        _choice("figures", self.figures, FIGURE_SETS)
        self.num_samples = _int("num_samples", self.num_samples, optional=True)
        _choice("target_kind", self.target_kind, TARGET_KINDS)
        self.metric = parse_metrics(self.metric)
        self.topk = _int("topk", self.topk, minimum=2)
        self.bootstrap = _replicates(self.bootstrap)
        if self.plot_timestep is None:
            self.plot_timestep = min(self.timesteps, key=lambda v: (abs(as_float(v) - 0.5), as_float(v)))
        else:
            try:
                self.plot_timestep = parse_time(self.plot_timestep, "--plot-timestep")
            except TimeError as exc:
                raise OptionsError(str(exc)) from None
            if self.plot_timestep not in self.timesteps:
                raise OptionsError(f"--plot-timestep {label(self.plot_timestep)} is not one of --timesteps "
                                   f"{[label(t) for t in self.timesteps]}")


@dataclasses.dataclass
class ProbeOptions(AnalysisOptions):
    """:class:`AnalysisOptions` plus the probes' own: ``task`` (linear | segmentation), ``num_train`` /
    ``num_test`` (images per split; default the whole split, shapes 2000 / 500), ``backend`` (sklearn | torch,
    linear only), the probe's hyper-parameters (None = its defaults): ``c_grid`` (inverse regularisation grid of
    the sklearn probe), ``lr`` (learning-rate grid of the torch linear probe; one value for the segmentation
    probe), ``epochs`` (torch / segmentation probe); ``encoder_reference`` (also probe the encoder),
    ``max_feature_gb`` (features held per extraction pass), ``bootstrap`` (replicates over test images for
    95% intervals of linear-probe accuracy, stored in ``replicates.npz``; 0 = off). The model is always fed
    its null class."""

    timesteps: Any = (0.0, 0.25, 0.5)
    task: str = "linear"
    num_train: int | None = None
    num_test: int | None = None
    backend: str = "sklearn"
    c_grid: Any = None
    lr: Any = None
    epochs: int | None = None
    encoder_reference: bool = False
    max_feature_gb: float = 4.0
    bootstrap: int = 200

    def validate(self) -> None:
        super().validate()
        _choice("task", self.task, TASKS)
        self.bootstrap = _replicates(self.bootstrap)
        _choice("backend", self.backend, BACKENDS)
        if self.labels != "null":
            raise OptionsError("--labels must be null for probes: the true class would hand the probe its answer")
        self.num_train = _int("num_train", self.num_train, optional=True)
        self.num_test = _int("num_test", self.num_test, optional=True)
        self.epochs = _int("epochs", self.epochs, optional=True)
        self.c_grid = _positive_floats("c_grid", self.c_grid)
        self.lr = _positive_floats("lr", self.lr)
        if self.c_grid is not None and (self.task, self.backend) != ("linear", "sklearn"):
            raise OptionsError("--c-grid is the grid of the sklearn linear probe (--backend sklearn)")
        if self.lr is not None and (self.task, self.backend) == ("linear", "sklearn"):
            raise OptionsError("--lr applies to the torch linear probe (--backend torch) and the segmentation probe")
        if self.lr is not None and self.task == "segmentation" and len(self.lr) != 1:
            raise OptionsError(f"--lr: the segmentation probe takes one learning rate, got {self.lr}")
        if isinstance(self.max_feature_gb, bool) or not isinstance(self.max_feature_gb, numbers.Real) \
                or not self.max_feature_gb > 0:
            raise OptionsError(f"--max-feature-gb must be a number > 0, got {self.max_feature_gb!r}")

    @property
    def prefix(self) -> str:
        """Output name: ``probe`` (linear) or ``segment`` (segmentation)."""
        return "probe" if self.task == "linear" else "segment"

