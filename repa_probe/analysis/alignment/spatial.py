"""Spatial-structure metrics inside the alignment analysis (``analysis.alignment --metric lds,cds,srss,rmsc``).

For every checkpoint × block × timestep the block's token grid ``(N, T, D)`` on the noisy input ``x_t`` (the
same seeded noise as CKNNA) gets :mod:`repa_probe.analysis.metrics.spatial`'s per-image values; a row holds their
mean over images (NaN images, e.g. SRSS without a usable mask, left out; ``n`` = images used) and, with
``bootstrap``, a 95% percentile interval over images. The target encoder's patch tokens of the clean
images give the reference rows (``layer = "target"``, no timestep, repeated for every checkpoint so that
each checkpoint carries its own target's value). The model's values come from the alignment's single capture
pass (:class:`SpatialValues` reduces each batch of tokens as it is captured); no ``(N, T, D)`` or ``(N, T, T)``
tensor is ever held.

SRSS masks: the dataset's ``mask`` (``0`` = background, ``255`` = VOC's void border, anything else =
foreground), max-pooled to the token grid (a token is foreground if any of its pixels is); an image with
fewer than ``min_fraction`` (iREPA: 64/256 = 0.25) foreground or background tokens is left out. A dataset
without masks drops SRSS with a notice.
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from repa_probe.analysis.core.capture import Reducer, capture
from repa_probe.analysis.core.features import CaptureSettings, ModelInputs, capture_spec
from repa_probe.analysis.metrics.spatial import SpatialSettings, grid_shape, spatial_metrics
from repa_probe.analysis.core.targets import encoder_features
from repa_probe.data import collate
from repa_probe.reports.bootstrap import interval, resample_means
from repa_probe.timesteps import label

__all__ = ["token_masks", "summarise", "SpatialValues", "model_spatial_values", "target_spatial_values",
           "spatial_rows", "SpatialAnalysis"]

log = logging.getLogger("repa_probe")

BUDGET_BYTES = 1 << 30          # float32 target-encoder tokens held at once
MIN_FRACTION = 0.25             # iREPA keeps masks with >= 64 FG and >= 64 BG tokens of 256
IGNORE_INDEX = 255


def token_masks(dataset, grid: tuple[int, int], batch_size: int = 64, min_fraction: float = MIN_FRACTION):
    """Foreground masks ``(N, H*W)`` bool on a token ``grid`` from the dataset's pixel masks, or None when the
    dataset has none. Images outside ``[min_fraction, 1 - min_fraction]`` foreground get an empty mask."""
    if len(dataset) == 0 or "mask" not in dataset[0]:
        return None
    out = []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate):
        m = torch.as_tensor(batch["mask"])
        fg = ((m != 0) & (m != IGNORE_INDEX)).float()[:, None]           # (b, 1, H_img, W_img)
        out.append(F.adaptive_max_pool2d(fg, grid).flatten(1) > 0)      # (b, H*W)
    masks = torch.cat(out)
    frac = masks.float().mean(1)
    keep = (frac >= min_fraction) & (frac <= 1 - min_fraction)
    return masks & keep[:, None]


def summarise(values: torch.Tensor, bootstrap: int = 0, seed: int = 0) -> dict:
    """``{value, ci_low, ci_high, n}``: the mean of per-image ``values: (N,)`` over the non-NaN ones, a 95%
    bootstrap interval of that mean over images (``bootstrap`` replicates drawn over all N images, NaN left
    out of each mean: the same images for every checkpoint, so differences pair), and the number of images
    used; with ``bootstrap`` also ``replicates`` (popped into ``replicates.npz`` by the run skeleton)."""
    n = int((~values.isnan()).sum())
    if n == 0:
        return dict(value=math.nan, ci_low=None, ci_high=None, n=0)
    value = float(values[~values.isnan()].double().mean())
    if not bootstrap or n < 2:
        return dict(value=value, ci_low=None, ci_high=None, n=n)
    reps = resample_means(values.double().numpy(), bootstrap, seed)
    lo, hi = interval(value, reps)
    return dict(value=value, ci_low=lo, ci_high=hi, n=n, replicates=reps, replicate_scale=1.0)


class SpatialValues(Reducer):
    """A capture reducer: per-image spatial metrics of every captured layer's tokens, ``values[(layer, t)] =
    {name: (N,)}`` (float32, CPU). ``masks: (N, T)`` foreground on the model's token grid (SRSS);
    ``settings``: :class:`~repa_probe.analysis.metrics.spatial.SpatialSettings` (default iREPA's code)."""

    class_tokens = False  # a REG class token is one token: no spatial structure

    def __init__(self, names: Sequence[str], masks=None, settings: SpatialSettings | None = None):
        self.names, self.masks, self.settings, self.values = list(names), masks, settings, {}

    def start(self, n: int) -> None:
        self.n, self.values = n, {}

    def add(self, key, t, rows: slice, tokens: torch.Tensor) -> None:
        masks = None if self.masks is None else self.masks[rows].to(tokens.device)
        got = spatial_metrics(tokens.float(), self.names, masks=masks, settings=self.settings)
        out = self.values.setdefault((key, t), {k: torch.full((self.n,), math.nan) for k in self.names})
        for k, v in got.items():
            out[k][rows] = v.cpu()


@torch.no_grad()
def model_spatial_values(model, objective, inputs: ModelInputs, timesteps, layers, names: Sequence[str],
                         masks=None, settings: CaptureSettings | None = None) -> dict:
    """``{(layer, t): {name: (N,)}}`` per-image spatial metrics of the model's block tokens at each timestep, in
    one capture pass. ``masks``: ``(N, T)`` foreground masks on the model's token grid (needed for ``srss``)."""
    spec = capture_spec(model, inputs, timesteps, layers, settings or CaptureSettings())
    reducer = SpatialValues(names, masks)
    capture(model, objective, inputs, spec, [reducer])
    return reducer.values


def _chunk_size(per_image_bytes: int, budget_bytes: int) -> int:
    return max(1, int(budget_bytes // max(1, per_image_bytes)))


@torch.no_grad()
def target_spatial_values(encoder, dataset, names: Sequence[str], masks=None, *, batch_size: int = 64,
                          progress: bool = True) -> dict:
    """``{name: (N,)}`` per-image spatial metrics of the encoder's final patch tokens of the clean images
    (at most :data:`BUDGET_BYTES` of tokens at once)."""
    device = next(encoder.parameters()).device
    n = len(dataset)
    step = _chunk_size(4 * encoder.num_tokens * encoder.embed_dim, BUDGET_BYTES)
    parts = []
    for a in tqdm(range(0, n, step), desc="spatial target", disable=not progress, leave=False):
        b = min(a + step, n)
        tokens = encoder_features(encoder, Subset(dataset, range(a, b)), "patch", batch_size=batch_size,
                                  progress=False).to(device)
        m = None if masks is None else masks[a:b].to(device)
        parts.append({k: v.cpu() for k, v in spatial_metrics(tokens, names, masks=m).items()})
    return {k: torch.cat([p[k] for p in parts]) for k in names}


def spatial_rows(values: dict, checkpoint: str, step, bootstrap: int = 0, seed: int = 0) -> list[dict]:
    """Alignment-CSV rows from ``{(layer, t): {name: (N,)}}`` (``layer="target"``, ``t=None`` for the target)."""
    rows = []
    for (layer, t), per_metric in values.items():
        for name, v in per_metric.items():
            rows.append(dict(checkpoint=checkpoint, step=step, layer=layer, timestep=None if t is None else label(t),
                             metric=name, **summarise(v, bootstrap, seed)))
    return rows


class SpatialAnalysis:
    """The spatial part of :class:`~repa_probe.analysis.alignment.AlignmentAnalysis`: masks (per token grid) and the
    target's values computed once; per checkpoint a :meth:`reducer` joins the alignment's capture pass and
    :meth:`rows` turns its values into rows. ``names``: spatial metric names (SRSS is dropped with a notice when
    the dataset has no masks); ``options``: the alignment options (batch size, seed, bootstrap, progress)."""

    def __init__(self, names: Sequence[str], dataset, encoder, options, device):
        self.dataset, self.options, self._masks = dataset, options, {}
        self.names = list(names)
        if "srss" in self.names and (len(dataset) == 0 or "mask" not in dataset[0]):
            log.warning("srss skipped: the dataset has no segmentation masks (shapes, voc and ade20k have them)")
            self.names.remove("srss")
        self.target = {}
        if self.names:
            encoder = encoder.to(device)
            masks = self.masks((encoder.grid_size, encoder.grid_size)) if "srss" in self.names else None
            self.target = target_spatial_values(encoder, dataset, self.names, masks, batch_size=options.batch_size,
                                                progress=options.progress)

    def masks(self, grid: tuple[int, int]):
        """``(N, H*W)`` foreground masks on ``grid`` (cached)."""
        if grid not in self._masks:
            self._masks[grid] = token_masks(self.dataset, grid, self.options.batch_size)
        return self._masks[grid]

    def reducer(self, model) -> SpatialValues | None:
        """The capture reducer for ``model`` (its token grid's masks), None when no spatial metric is left."""
        if not self.names:
            return None
        return SpatialValues(self.names, self.masks(grid_shape(model.num_tokens)) if "srss" in self.names else None)

    def rows(self, values: dict, checkpoint: str, step) -> list[dict]:
        """Rows of one checkpoint from its reducer's ``values`` (every block x timestep), plus the target's
        (``layer="target"``)."""
        if not self.names:
            return []
        values = {**values, ("target", None): self.target}
        return spatial_rows(values, checkpoint, step, self.options.bootstrap, self.options.seed)

    def describe(self) -> dict:
        return dict(metrics=self.names, settings="iREPA code defaults: LDS near d=1, far d>=6; CDS d=1..8; "
                    "SRSS d_pos=1, d_neg=6; RMSC sqrt", model_tokens="block outputs on x_t (seeded noise)",
                    target_tokens="final-norm patch tokens of the clean images (layer='target')",
                    srss_masks=f"dataset masks max-pooled to the token grid, images with >= {MIN_FRACTION:g} "
                               "foreground and background tokens", value="mean over images (NaN left out)")
