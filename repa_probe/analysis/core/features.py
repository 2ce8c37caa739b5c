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
from contextlib import nullcontext

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from repa_probe.analysis.core.options import LABEL_MODES
from repa_probe.analysis.errors import AnalysisInputError
from repa_probe.data import collate
from repa_probe.sampling.noise import CLASS_TOKEN_KEY, seeded_noise
from repa_probe.timesteps import DDPM_STEPS, check_objective, model_times, parse_time, parse_times

log = logging.getLogger("repa_probe")

POOLS = ("mean", "tokens", "projector")
LATENT_LAYER = 0  # --layers latent: the clean latent tokens, patchified as the model sees them (no block)

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


def latent_tokens(model, x0: torch.Tensor) -> torch.Tensor:
    """Layer 0, ``latent``: the clean input ``x0: (b, C, H, W)`` patchified as the model's patch embedding reads
    it -> ``(b, T, C·p·p)`` (token order and per-token (C, p, p) order of ``x_embedder.proj``)."""
    p = model.patch_size
    b, c, h, w = x0.shape
    x = x0.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


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


def _labels(model, inputs: ModelInputs, mode: str) -> torch.Tensor:
    """Class labels fed to the model: the null class (unconditional) or the dataset's labels."""
    if mode not in LABEL_MODES:
        raise AnalysisInputError(f"labels must be one of {LABEL_MODES}, got {mode!r}")
    rows, n_cls = model.y_embedder.num_rows, model.num_classes
    if mode == "null":
        if rows <= n_cls:
            raise AnalysisInputError("the model has no null class (class_dropout_prob = 0): use labels='true'")
        return torch.full_like(inputs.labels, n_cls)
    if len(inputs.labels) and (int(inputs.labels.min()) < 0 or int(inputs.labels.max()) >= n_cls):
        raise AnalysisInputError(f"dataset labels span [{int(inputs.labels.min())}, {int(inputs.labels.max())}] "
                           f"but the model has {n_cls} classes: use labels='null'")
    return inputs.labels


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
    if pool not in POOLS:
        raise AnalysisInputError(f"pool must be one of {POOLS}, got {pool!r}")
    layer_list = resolve_layers(model, layers)
    if pool == "projector":
        if not len(model.projectors):
            raise AnalysisInputError("pool='projector' needs a model with REPA projectors")
        if layer_list != [model.encoder_depth]:
            if layers not in (None, "all"):
                raise AnalysisInputError(f"pool='projector' reads block {model.encoder_depth} only, got layers {layer_list}")
            layer_list = [model.encoder_depth]
    return layer_list


@torch.no_grad()
def extract_features(model, objective, data, timesteps, layers="all", pool: str = "mean", vae=None,
                     device=None, batch_size: int = 64, seed: int = 0, dtype: torch.dtype = torch.float32,
                     labels: str = "null", num_workers: int = 0, progress: bool = True) -> FeatureSet:
    """Hidden states of ``model`` for every sample of ``data`` at each timestep.

    One forward pass per (batch, timestep) captures every requested block (the model's early-stopping
    ``forward_features``: blocks after the deepest requested one are not run). bf16 autocast on CUDA,
    fp32 on the CPU; features are stored on the CPU as ``dtype`` (float32 or float16).

    Args:
        model: a DiffusionTransformer, already on ``device`` (default: its own device), eval mode.
        objective: FlowMatching or GaussianDiffusion matching ``model.time_convention``.
        data: a Dataset of dicts, an unshuffled DataLoader or :class:`ModelInputs`.
        timesteps: user times (see :func:`repa_probe.timesteps.parse_times`); the keys of the result.
        layers: ``"all"`` or 1-based block numbers (block 8 = REPA's encoder_depth 8); 0 is the clean latent
            itself (:func:`latent_tokens`; the same at every t), to compare latent spaces (SD-VAE, REPA-E's).
        pool: ``"mean"`` -> ``(N, D)`` token mean; ``"tokens"`` -> ``(N, T, D)``; ``"projector"`` ->
            ``(N, z_dim)`` token mean of the first REPA projector's output (layer = encoder_depth only).
        labels: ``"null"`` (unconditional class) or ``"true"`` (dataset labels).
    """
    if dtype not in (torch.float32, torch.float16):
        raise AnalysisInputError(f"dtype must be float32 or float16, got {dtype}")
    check_objective(model.time_convention, objective)
    layer_list = _pooled_layers(model, layers, pool)
    blocks = [v for v in layer_list if v != LATENT_LAYER]
    user_t = parse_times(timesteps)
    process_t, model_t = model_times(user_t, model.time_convention, getattr(objective, "num_timesteps", DDPM_STEPS))
    device = module_device(model, device, "model")
    inputs = data if isinstance(data, ModelInputs) else prepare_inputs(data, vae, batch_size, num_workers, progress)
    y_all = _labels(model, inputs, labels)
    n = len(inputs)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    feats: dict = {}
    class_token: dict = {}
    steps = range(0, n, batch_size)
    bar = tqdm(total=len(steps) * len(user_t), desc="features", disable=not progress, leave=False)
    for start in steps:
        stop = min(start + batch_size, n)
        batch = _Batch(inputs.x0(start, stop, device), y_all[start:stop].to(device),
                       inputs.noise(start, stop, seed, device),
                       inputs.class_tokens(start, stop, seed, device, model.cls_token_dim)
                       if getattr(model, "cls_token_dim", 0) else None)
        for t_user, t_proc, t_net in zip(user_t, process_t, model_t):
            with autocast:
                hidden, cls_hidden = _block_outputs(model, objective, batch, t_proc, t_net, blocks, pool)
            if LATENT_LAYER in layer_list:  # layer 0: the clean latent tokens (no block, the same at every t)
                hidden = [latent_tokens(model, batch.x0)] + hidden
                cls_hidden = [None] + cls_hidden if cls_hidden else cls_hidden
            for layer, h, c in zip(layer_list, hidden, cls_hidden or [None] * len(hidden)):
                out = h.float().mean(dim=1) if pool in ("mean", "projector") else h.float()
                _store(feats, (layer, t_user), out, start, stop, n, dtype)
                if c is not None:
                    _store(class_token, (layer, t_user), c.float(), start, stop, n, dtype)
            bar.update(1)
    bar.close()
    return FeatureSet(feats, layer_list, user_t, model_t.tolist(), inputs.labels, inputs.indices, pool, class_token)


@dataclasses.dataclass
class _Batch:
    """Clean inputs of one batch: ``x0: (b, C, H, W)``, ``y: (b,)``, ``noise`` like x0, ``cls``: REG's (clean
    class tokens, their noise), each ``(b, D_c)``, or None."""

    x0: torch.Tensor
    y: torch.Tensor
    noise: torch.Tensor
    cls: tuple | None


def _block_outputs(model, objective, batch: _Batch, t_proc, t_net, layer_list, pool: str) -> tuple[list, list]:
    """The requested blocks' patch tokens ``(b, T, D)`` (the projector's output for ``pool="projector"``) at one
    time, and for a REG model its class token's ``(b, D)`` hidden state per block (else an empty list)."""
    b = batch.x0.shape[0]
    x_t = objective.add_noise(batch.x0, t_proc.expand(b).to(batch.x0.device), batch.noise)
    kwargs = {}
    if batch.cls is not None:
        cls_t = objective.add_noise(batch.cls[0], t_proc.expand(b).to(batch.x0.device), batch.cls[1])
        kwargs = dict(cls_token=cls_t, prefix=True)
    hidden = model.forward_features(x_t, t_net.expand(b).to(batch.x0.device), batch.y,
                                    layers=[v - 1 for v in layer_list], **kwargs)
    p = model.num_prefix_tokens if kwargs else 0
    cls_hidden = [h[:, 0] for h in hidden] if p else []
    if pool == "projector":
        hidden = [model.project(hidden[0])[0]]
    return [h[:, p:] for h in hidden], cls_hidden


def _store(feats: dict, key, out: torch.Tensor, start: int, stop: int, n: int, dtype) -> None:
    """Write batch rows ``out`` into ``feats[key]`` (an ``(n, ...)`` CPU tensor of ``dtype``, made on first use)."""
    if key not in feats:
        feats[key] = torch.empty((n, *out.shape[1:]), dtype=dtype)
    feats[key][start:stop] = out.to(dtype).cpu()
