"""One forward pass per (batch, timestep), shared by every metric: capture the blocks, let each reducer pool.

:func:`capture` runs the model once per batch of images and user time, keeps the token outputs of every
requested block (``(b, T, D)``, the model's early-stopping ``forward_features``: blocks after the deepest one
are not run) and hands them to each :class:`Reducer`, which keeps what its metric needs: the token mean for
CKNNA and the linear probe (:class:`MeanPool`), the tokens for the segmentation probe (:class:`Tokens`),
per-image spatial-structure values (:class:`~repa_probe.analysis.alignment.spatial.SpatialValues`). No
reducer sees more than one batch of tokens at a time, so the alignment with five metrics costs one pass.

Extra "layers": a :class:`CaptureSpec` may name derived outputs (``extras``: name -> function of the model and
the captured blocks, e.g. :func:`projector_tokens`; a class token or a latent are added the same way); the
reducers see them under that name, like a block number (``report``: the keys handed on, default all). Layer 0
(``latent``) is the clean latent itself (:func:`latent_tokens`, no block run for it). A REG
model's class token (fed noised with the image's t, from :meth:`ModelInputs.class_tokens`) is stripped from every
block's tokens and handed on as its own "layer" :func:`class_key` (to reducers with ``class_tokens``).

Time: user times (``t = 0`` clean data, ``t = 1`` pure noise, or ``step:N``) are mapped to each model's
input by :func:`repa_probe.timesteps.model_times`. Noise: :meth:`ModelInputs.noise` (keyed by the seed and the
dataset index, so every batch size and checkpoint sees the same noisy image).
"""
from __future__ import annotations

import abc
import dataclasses
from contextlib import nullcontext
from typing import Any, Callable, Sequence

import torch
from tqdm import tqdm

from repa_probe.timesteps import DDPM_STEPS, model_times

#: a derived output: ``f(model, hidden: {layer: (b, T, D)}) -> (b, T', D')`` (under the capture's autocast)
Extra = Callable[[Any, dict], torch.Tensor]


CLASS_TOKEN = "cls"
LATENT_LAYER = 0  # --layers latent: the clean latent tokens, patchified as the model sees them (no block)


def latent_tokens(model, x0: torch.Tensor) -> torch.Tensor:
    """Layer 0, ``latent``: the clean input ``x0: (b, C, H, W)`` patchified as the model's patch embedding reads
    it -> ``(b, T, C·p·p)`` (token order and per-token (C, p, p) order of ``x_embedder.proj``)."""
    p = model.patch_size
    b, c, h, w = x0.shape
    x = x0.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def class_key(layer) -> tuple:
    """The key of a REG model's class token at block ``layer`` (its own "layer")."""
    return (CLASS_TOKEN, layer)


def is_class_token(key) -> bool:
    return isinstance(key, tuple) and len(key) == 2 and key[0] == CLASS_TOKEN


def projector_tokens(model, hidden: dict) -> torch.Tensor:
    """The first REPA projector applied to block ``encoder_depth``'s tokens: ``(b, T, z_dim)``."""
    return model.project(hidden[model.encoder_depth])[0]


@dataclasses.dataclass
class CaptureSpec:
    """What one capture computes: 1-based ``layers`` (already checked against the model), user ``timesteps``
    (parsed), the ``labels`` tensor fed to the model ``(N,)`` int64, the noise ``seed``, ``batch_size``, the
    ``device`` (where the model is), ``extras`` (derived outputs by name) and ``progress``."""

    layers: Sequence[int]
    timesteps: Sequence
    labels: torch.Tensor
    seed: int
    batch_size: int
    device: torch.device
    extras: dict = dataclasses.field(default_factory=dict)
    report: Sequence | None = None
    progress: bool = True

    @property
    def keys(self) -> list:
        """What the reducers receive: ``report`` when given, else the block numbers, then the extras' names."""
        return list(self.report) if self.report is not None else list(self.layers) + list(self.extras)


class Reducer(abc.ABC):
    """Receives the tokens of every captured layer for each (batch, timestep) and keeps what it needs.
    ``class_tokens``: whether it also receives a REG model's class token (key :func:`class_key`, ``(b, 1, D)``)."""

    class_tokens = True

    def start(self, n: int) -> None:
        """Called once before the pass with the number of samples."""

    @abc.abstractmethod
    def add(self, key, t, rows: slice, tokens: torch.Tensor) -> None:
        """``tokens: (b, T, D)`` (float32 or the autocast dtype) of layer ``key`` at user time ``t`` for samples
        ``rows``."""


class _Store(Reducer):
    """Keeps ``(N, *out)`` per (layer, t) on the CPU as ``dtype``."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        self.dtype, self.features = dtype, {}

    def start(self, n: int) -> None:
        self.n, self.features = n, {}

    @abc.abstractmethod
    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens: (b, T, D)`` float32 -> what is stored per sample, ``(b, *out)``."""

    def add(self, key, t, rows: slice, tokens: torch.Tensor) -> None:
        out = self.pool(tokens.float())
        if (key, t) not in self.features:
            self.features[(key, t)] = torch.empty((self.n, *out.shape[1:]), dtype=self.dtype)
        self.features[(key, t)][rows] = out.to(self.dtype).cpu()


class MeanPool(_Store):
    """Token mean per (layer, t): ``(N, D)``."""

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.mean(dim=1)


class Tokens(_Store):
    """The tokens per (layer, t): ``(N, T, D)``."""

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens


@torch.no_grad()
def capture(model, objective, inputs, spec: CaptureSpec, reducers: Sequence[Reducer]) -> list:
    """One forward pass of ``model`` per (batch, timestep) of ``inputs`` (:class:`~repa_probe.analysis.core.
    features.ModelInputs`), handing every captured layer's tokens to each reducer. bf16 autocast on CUDA, fp32
    on the CPU. Returns what the network received as time for each user time (``model_times``)."""
    process_t, model_t = model_times(list(spec.timesteps), model.time_convention,
                                     getattr(objective, "num_timesteps", DDPM_STEPS))
    device, n = spec.device, len(inputs)
    for r in reducers:
        r.start(n)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    block_layers = [v for v in spec.layers if v != LATENT_LAYER]
    blocks = [v - 1 for v in block_layers]
    starts = range(0, n, spec.batch_size)
    bar = tqdm(total=len(starts) * len(model_t), desc="features", disable=not spec.progress, leave=False)
    for start in starts:
        rows = slice(start, min(start + spec.batch_size, n))
        b = rows.stop - rows.start
        x0, noise = inputs.x0(rows.start, rows.stop, device), inputs.noise(rows.start, rows.stop, spec.seed, device)
        y = spec.labels[rows].to(device)
        cls = inputs.class_tokens(rows.start, rows.stop, spec.seed, device, model.cls_token_dim) \
            if getattr(model, "cls_token_dim", 0) else None
        for t_user, t_proc, t_net in zip(spec.timesteps, process_t, model_t):
            t_b = t_proc.expand(b).to(device)
            x_t = objective.add_noise(x0, t_b, noise)
            kwargs = {} if cls is None else dict(cls_token=objective.add_noise(cls[0], t_b, cls[1]), prefix=True)
            with autocast:
                raw = dict(zip(block_layers, model.forward_features(x_t, t_net.expand(b).to(device), y,
                                                                    layers=blocks, **kwargs))) if blocks else {}
                raw.update({name: fn(model, raw) for name, fn in spec.extras.items()})
            p = model.num_prefix_tokens if kwargs else 0       # REG: the class token leads every block's tokens
            hidden = {key: h[:, p:] for key, h in raw.items()}
            if LATENT_LAYER in spec.layers:                    # layer 0: the clean latent (the same at every t)
                hidden[LATENT_LAYER] = latent_tokens(model, x0)
            keys = spec.keys
            if p:
                hidden.update({class_key(layer): raw[layer][:, :p] for layer in block_layers})
                keys = keys + [class_key(layer) for layer in block_layers]
            for key in keys:
                for r in reducers:
                    if r.class_tokens or not is_class_token(key):
                        r.add(key, t_user, rows, hidden[key])
            bar.update(1)
    bar.close()
    return model_t.tolist()
