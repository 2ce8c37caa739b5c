"""Hidden states of a diffusion transformer, for alignment analysis and probes (encoder targets: ``targets``).

Time: user times (``t = 0`` clean data, ``t = 1`` pure noise, or ``step:N``) are mapped to each model's
input by :func:`repa_probe.timesteps.model_times`, following ``model.time_convention``.

Determinism: the noise of sample ``i`` depends only on ``(seed, dataset index i)`` (a counter-based
generator, :func:`repa_probe.sampling.noise.seeded_noise`), so every checkpoint, timestep, batch size and
device sees the same noise for the same image. VAE latents are the posterior mean (scaled), not a sample.

REG models (``cls_token_dim > 0``) take the class token of their training encoder as an input: it is noised with
the image's t (its own seeded noise) from :attr:`ModelInputs.cls`; their block outputs lose that token before
pooling (patch tokens only), and it is kept apart as :attr:`FeatureSet.class_token` (analysed as its own "layer").

Shapes: N samples, C/H/W model input, T tokens, D width.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from repa_probe.analysis.core.capture import (LATENT_LAYER, CaptureSpec, MeanPool, Tokens, capture, is_class_token,
                                              projector_tokens)

from repa_probe.analysis.core.options import LABEL_MODES
from repa_probe.analysis.errors import AnalysisInputError
from repa_probe.data import collate
from repa_probe.sampling.noise import CLASS_TOKEN_KEY, seeded_noise
from repa_probe.timesteps import check_objective, parse_time, parse_times

log = logging.getLogger("repa_probe")

POOLS = ("mean", "tokens", "projector")

# ------------------------------------------------------------------------------------------- model inputs
@dataclasses.dataclass
class ModelInputs:
    """Clean inputs of N samples, computed once and reused for every checkpoint and timestep.

    ``data``: uint8 images ``(N, 3, H, W)`` when ``pixel`` (mapped to [-1, 1] per batch) or float32
    latents ``(N, C, h, w)`` (VAE posterior mean * scale + bias); ``labels: (N,)`` int64;
    ``indices: (N,)`` int64 dataset indices (they key the noise); ``cls: (N, D_c)`` float32 clean class tokens
    of a REG model's training encoder, or None (see :mod:`repa_probe.analysis.core.class_token`).
    """

    data: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    pixel: bool
    cls: torch.Tensor | None = None
    _noise: dict = dataclasses.field(default_factory=dict, repr=False)

    #: the noise of the whole dataset is memoised (per seed) up to this many bytes, else recomputed per batch
    max_cached_noise_bytes = 2 ** 31

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def noise(self, start: int, stop: int, seed: int, device) -> torch.Tensor:
        """:func:`seeded_noise` for rows ``start:stop``, float32 ``(b, C, H, W)`` on ``device``."""
        shape = self.data.shape[1:]
        if len(self) * math.prod(shape) * 4 > self.max_cached_noise_bytes:
            return seeded_noise(seed, self.indices[start:stop], shape, device=device)
        if seed not in self._noise:
            self._noise.clear()
            self._noise[seed] = torch.cat([seeded_noise(seed, self.indices[i:i + 1024], shape)
                                           for i in range(0, len(self), 1024)])
        return self._noise[seed][start:stop].to(device)

    def class_tokens(self, start: int, stop: int, seed: int, device, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """REG: rows ``start:stop`` of the clean class tokens and their seeded noise, float32 ``(b, dim)`` each."""
        if self.cls is None or self.cls.shape[1:] != (dim,):
            got = "none" if self.cls is None else f"width {self.cls.shape[-1]}"
            raise AnalysisInputError(f"a REG model needs the class tokens of its training encoder (width {dim}), got {got}")
        noise = seeded_noise(seed ^ CLASS_TOKEN_KEY, self.indices[start:stop], (dim,), device=device)
        return self.cls[start:stop].to(device).float(), noise

    def subset(self, start: int, stop: int) -> "ModelInputs":
        """Rows ``start:stop`` (same noise keys: the dataset indices travel along)."""
        cls = None if self.cls is None else self.cls[start:stop]
        return ModelInputs(self.data[start:stop], self.labels[start:stop], self.indices[start:stop], self.pixel, cls)

    def x0(self, start: int, stop: int, device) -> torch.Tensor:
        """Rows ``start:stop`` as float32 model inputs ``(b, C, H, W)`` on ``device``."""
        x = self.data[start:stop].to(device)
        return x.float() / 127.5 - 1.0 if self.pixel else x.float()


def batch_loader(data, batch_size: int, num_workers: int) -> DataLoader:
    """``data`` itself when it is a DataLoader, else an unshuffled DataLoader of it (the datasets' collate)."""
    if isinstance(data, DataLoader):
        return data
    return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)


@torch.no_grad()
def prepare_inputs(data, vae=None, batch_size: int = 64, num_workers: int = 0,
                   progress: bool = True) -> ModelInputs:
    """Clean model inputs for every sample of ``data`` (a Dataset of dicts, or an unshuffled DataLoader).

    Pixel space (``vae=None``): the uint8 images are kept. Latent space: the posterior mean of the
    stored ``moments`` (or of ``vae.encode_moments`` on the VAE's device), normalised by the VAE
    (``vae.normalize``: SD-VAE's scale, or per-channel statistics), as float32 on the CPU. Indices are
    positions in iteration order.
    """
    chunks, labels = [], []
    for batch in tqdm(batch_loader(data, batch_size, num_workers), desc="inputs", disable=not progress, leave=False):
        images = batch["image"]
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise AnalysisInputError(f"dataset images must be uint8 (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if vae is None:
            chunks.append(images)
        else:
            moments = batch["moments"] if "moments" in batch else vae.encode_moments(images.to(vae.device))
            mean = moments.float().chunk(2, dim=1)[0]
            chunks.append(vae.normalize(mean).cpu())  # SD-VAE: mean * 0.18215; REPA-E: per channel
        labels.append(torch.as_tensor(batch["label"]).reshape(-1).to(torch.int64))
    if not chunks:
        raise AnalysisInputError("the dataset is empty")
    x = torch.cat(chunks)
    return ModelInputs(x, torch.cat(labels), torch.arange(x.shape[0], dtype=torch.int64), pixel=vae is None)


class InputsByVAE:
    """:func:`prepare_inputs` of one dataset for each checkpoint's VAE: REPA-E checkpoints read latents with their
    own (tuned, or normalised by their BatchNorm statistics), every other one shares the source's. The shared
    inputs are kept; of the others only the latest (checkpoints are analysed one after another)."""

    def __init__(self, data, shared: ModelInputs, shared_vae, device, batch_size: int, progress: bool):
        self.data, self.device, self.batch_size, self.progress = data, device, batch_size, progress
        self.shared, self.shared_vae, self._last = shared, shared_vae, (None, None)

    def get(self, vae) -> ModelInputs:
        """The inputs as ``vae`` (an entry's LatentVAE or None) encodes and normalises them."""
        if vae is self.shared_vae:
            return self.shared
        if self._last[0] is not vae:
            self._last = (vae, prepare_inputs(self.data, vae.to(self.device) if vae is not None else None,
                                              self.batch_size, progress=self.progress))
        return self._last[1]


# ------------------------------------------------------------------------------------------ extraction
@dataclasses.dataclass
class FeatureSet:
    """Features of N samples per (layer, timestep).

    ``features[(layer, t)]``: ``(N, D)`` pooled or ``(N, T, D)`` tokens, on the CPU; ``layers`` 1-based
    block numbers; ``timesteps`` the user times (floats or :class:`~repa_probe.timesteps.Step`);
    ``model_times`` what the network received for each;
    ``labels: (N,)``; ``indices: (N,)``; ``class_token[(layer, t)]``: REG models, the class token's ``(N, D)``
    hidden state (empty otherwise).
    """

    features: dict
    layers: list
    timesteps: list
    model_times: list
    labels: torch.Tensor
    indices: torch.Tensor
    pool: str
    class_token: dict = dataclasses.field(default_factory=dict)

    def get(self, layer: int, t) -> torch.Tensor:
        """Features of block ``layer`` (1-based) at user timestep ``t``: ``(N, D)`` or ``(N, T, D)``."""
        try:
            return self.features[(layer, parse_time(t))]
        except KeyError:
            raise AnalysisInputError(f"no features for layer {layer} at t={t}; have layers {self.layers}, "
                               f"timesteps {self.timesteps}") from None


def resolve_layers(model, layers) -> list[int]:
    """``"all"``/None or an iterable of 1-based block numbers (0 = ``latent``, the clean latent tokens) -> sorted
    unique list, validated. ``"all"`` means the blocks."""
    depth = model.depth
    if layers is None or layers == "all":
        return list(range(1, depth + 1))
    out = sorted({int(v) for v in layers})
    if not out:
        raise AnalysisInputError("no layers requested")
    bad = [v for v in out if not LATENT_LAYER <= v <= depth]
    if bad:
        raise AnalysisInputError(f"layers {bad} are outside 1..{depth} (1-based block numbers, 0 = the latent; the "
                                 f"model has {depth} blocks)")
    return out


def check_labels_fit(model_classes: int, has_null: bool, mode: str, data_classes: int | None) -> None:
    """The one rule for the class labels a model is fed: ``mode="null"`` needs a null class (``has_null``, i.e.
    ``class_dropout_prob > 0``); ``mode="true"`` needs the model to know all ``data_classes`` classes of the data
    (None: the data has no labels). The run checks it per checkpoint before any forward pass
    (:mod:`~repa_probe.analysis.core.inputs`); :func:`model_labels` checks it for direct callers."""
    if mode == "null" and not has_null:
        raise AnalysisInputError("the model has no null class (class_dropout_prob = 0), so it cannot be read "
                                 "unconditionally: use labels 'true' (--labels true)")
    if mode == "true" and (data_classes is None or data_classes > model_classes):
        raise AnalysisInputError(f"the dataset has {data_classes} classes but the model {model_classes}: use "
                                 "labels 'null' (--labels null)")


def model_labels(model, labels: torch.Tensor, mode: str) -> torch.Tensor:
    """Class labels fed to the model ``(N,)``: its null class (``mode="null"``, unconditional) or ``labels``
    (``(N,)`` int64, ``>= 0``). ``mode`` is already one of :data:`LABEL_MODES` (checked by the options); the fit
    to the model is :func:`check_labels_fit`."""
    n_cls = model.num_classes
    data_classes = int(labels.max()) + 1 if len(labels) else 0
    check_labels_fit(n_cls, model.y_embedder.num_rows > n_cls, mode, data_classes)
    return torch.full_like(labels, n_cls) if mode == "null" else labels


def module_device(module: torch.nn.Module, device, what: str) -> torch.device:
    """The device to run ``module`` on: its own when ``device`` is None, else ``device``, which must be where the
    module is (``"cuda"`` means the current CUDA device, as ``Tensor.to("cuda")`` does)."""
    own = next(module.parameters()).device
    if device is None:
        return own
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if dev != own:
        raise AnalysisInputError(f"the {what} is on {own} but device={device}: move the {what} first")
    return dev


def _pooled_layers(model, layers, pool: str) -> list[int]:
    """The 1-based blocks to capture for ``pool`` (``projector``: only block ``encoder_depth``)."""
    layer_list = resolve_layers(model, layers)
    if pool == "projector":
        if not len(model.projectors):
            raise AnalysisInputError("pool='projector' needs a model with REPA projectors")
        if layer_list != [model.encoder_depth]:
            if layers not in (None, "all"):
                raise AnalysisInputError(f"pool='projector' reads block {model.encoder_depth} only, got layers {layer_list}")
            layer_list = [model.encoder_depth]
    return layer_list


@dataclasses.dataclass
class CaptureSettings:
    """How :func:`extract_features` runs: ``device`` (None = the model's own), ``batch_size``, noise ``seed``,
    ``labels`` fed to the model (``"null"``: unconditional, ``"true"``: the dataset's), ``dtype`` of the stored
    features (float32 or float16), ``num_workers`` (dataset loading), ``progress``. Checked when built."""

    device: Any = None
    batch_size: int = 64
    seed: int = 0
    labels: str = "null"
    dtype: torch.dtype = torch.float32
    num_workers: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.labels not in LABEL_MODES:
            raise AnalysisInputError(f"labels must be one of {LABEL_MODES}, got {self.labels!r}")
        if self.dtype not in (torch.float32, torch.float16):
            raise AnalysisInputError(f"dtype must be float32 or float16, got {self.dtype}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise AnalysisInputError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")


def capture_spec(model, inputs: ModelInputs, timesteps, layers, settings: CaptureSettings, extras=None,
                 report=None) -> CaptureSpec:
    """The :class:`~repa_probe.analysis.core.capture.CaptureSpec` of ``model`` on ``inputs``: ``layers`` checked
    against its depth, the labels it is fed, its device (``settings.device`` must be where it is)."""
    return CaptureSpec(resolve_layers(model, layers), parse_times(timesteps),
                       model_labels(model, inputs.labels, settings.labels), settings.seed, settings.batch_size,
                       module_device(model, settings.device, "model"), extras or {}, report, settings.progress)


@torch.no_grad()
def extract_features(model, objective, data, timesteps, layers="all", pool: str = "mean",
                     settings: CaptureSettings | None = None, vae=None) -> FeatureSet:
    """Hidden states of ``model`` for every sample of ``data`` at each timestep (one :func:`~repa_probe.
    analysis.core.capture.capture` pass: one forward per (batch, timestep) for every requested block).
    Features are stored on the CPU as ``settings.dtype``.

    Args:
        model: a DiffusionTransformer, already on ``settings.device`` (default: its own device), eval mode.
        objective: FlowMatching or GaussianDiffusion matching ``model.time_convention``.
        data: a Dataset of dicts, an unshuffled DataLoader or :class:`ModelInputs` (Datasets are encoded with
            ``vae`` when given).
        timesteps: user times (see :func:`repa_probe.timesteps.parse_times`); the keys of the result.
        layers: ``"all"`` or 1-based block numbers (block 8 = REPA's encoder_depth 8).
        pool: ``"mean"`` -> ``(N, D)`` token mean; ``"tokens"`` -> ``(N, T, D)``; ``"projector"`` ->
            ``(N, z_dim)`` token mean of the first REPA projector's output (layer = encoder_depth only).
        settings: :class:`CaptureSettings` (device, batch size, seed, labels, dtype, workers, progress).
    """
    s = settings or CaptureSettings()
    if pool not in POOLS:
        raise AnalysisInputError(f"pool must be one of {POOLS}, got {pool!r}")
    check_objective(model.time_convention, objective)
    layer_list = _pooled_layers(model, layers, pool)
    module_device(model, s.device, "model")
    inputs = data if isinstance(data, ModelInputs) else prepare_inputs(data, vae, s.batch_size, s.num_workers,
                                                                        s.progress)
    extras = {"projector": projector_tokens} if pool == "projector" else {}
    spec = capture_spec(model, inputs, timesteps, layer_list, s, extras, report=list(extras) or None)
    user_t = spec.timesteps
    store = Tokens(s.dtype) if pool == "tokens" else MeanPool(s.dtype)
    net_t = capture(model, objective, inputs, spec, [store])
    feats, class_token = {}, {}
    for (key, t), v in store.features.items():
        if is_class_token(key):                       # REG: the class token's (N, 1, D) or (N, D) hidden state
            class_token[(key[1], t)] = v.reshape(v.shape[0], -1)
        else:
            feats[(layer_list[0] if key == "projector" else key, t)] = v
    return FeatureSet(feats, layer_list, user_t, net_t, inputs.labels, inputs.indices, pool, class_token)
