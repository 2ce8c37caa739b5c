"""Linear segmentation probe on frozen patch tokens (DINOv2 "lin." protocol) and mIoU.

Probe: per-channel standardisation with training-split statistics, optional BatchNorm without affine
(DINOv2 "lin."), then a 1x1 convolution (a linear map per patch) to class logits ``(B, K, h, w)``, which are
bilinearly upsampled to the mask resolution ``(H, W)`` and trained with per-pixel cross-entropy (pixels
equal to ``ignore_index`` do not count) using AdamW with a cosine schedule. Early stopping: 10% of the training
images are held out, the epoch with the best held-out mIoU is kept and training stops after 2 epochs without a
gain (``EPOCHS``, ``VAL_FRACTION``, ``PATIENCE``). Evaluation takes the arg-max of the upsampled logits.

mIoU convention (the mmsegmentation one): from the confusion matrix over all valid test pixels (target !=
``ignore_index``), IoU_c = TP_c / (TP_c + FP_c + FN_c). A class that appears neither in the target nor in
the prediction has an undefined IoU (NaN, ``None`` in ``SegResult.per_class_iou``) and is left out of the
mean; a class that is predicted but absent from the ground truth has IoU 0 and counts. Pixel accuracy is
TP summed over classes / number of valid pixels.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from repa_probe.analysis.errors import MetricInputError
from repa_probe.analysis.probes.common import (Array, channel_stats, check_features, check_finite,
                                               check_num_classes, chunks, gather, rows_per_chunk)
from repa_probe.devices import resolve_device

EPOCHS = 10         # the most epochs of the probe (the cosine schedule spans them)
VAL_FRACTION = 0.1  # training images held out for early stopping
PATIENCE = 2        # epochs without a held-out gain before stopping
MIN_GAIN = 1e-3     # a held-out mIoU gain smaller than this is no gain


# ----------------------------------------------------------------------------------------------- mIoU
def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int | None = 255) -> torch.Tensor:
    """``(num_classes, num_classes)`` int64 counts, rows = target class, columns = predicted class.

    ``pred`` and ``target``: integer tensors of the same shape (any shape). Pixels whose target equals
    ``ignore_index`` are skipped. Predictions must lie in ``0..num_classes-1``; targets too, apart from
    ``ignore_index`` (else :class:`MetricInputError`).
    """
    num_classes = check_num_classes(num_classes)
    for name, v in (("pred", pred), ("target", target)):
        if not isinstance(v, torch.Tensor) or v.dtype.is_floating_point or v.dtype == torch.bool:
            raise MetricInputError(f"{name} must be an integer torch.Tensor, got "
                                  f"{v.dtype if isinstance(v, torch.Tensor) else type(v).__name__}")
    if pred.shape != target.shape:
        raise MetricInputError(f"pred has shape {tuple(pred.shape)} but target has shape {tuple(target.shape)}")
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long().to(pred.device)
    valid = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    t, p = target[valid], pred[valid]
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        bad = int(t[(t < 0) | (t >= num_classes)][0])
        raise MetricInputError(f"target contains class {bad}, outside 0..{num_classes - 1} "
                              f"(ignore_index={ignore_index})")
    if p.numel() and (int(p.min()) < 0 or int(p.max()) >= num_classes):
        bad = int(p[(p < 0) | (p >= num_classes)][0])
        raise MetricInputError(f"pred contains class {bad}, outside 0..{num_classes - 1}")
    return torch.bincount(t * num_classes + p, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def iou_from_confusion(conf: torch.Tensor) -> tuple[float, float, list]:
    """``conf: (K, K)`` (rows = target) → (mIoU, pixel accuracy, per-class IoU list with None for classes
    absent from both target and prediction). Raises :class:`MetricInputError` if ``conf`` counts no pixel."""
    conf = conf.double().cpu()
    total = float(conf.sum())
    if total == 0:
        raise MetricInputError("no valid pixels to score (every target pixel is ignore_index)")
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
    present = ~torch.isnan(iou)
    return (float(iou[present].mean()), float(tp.sum()) / total,
            [float(v) if ok else None for v, ok in zip(iou.tolist(), present.tolist())])


def miou(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = 255) -> float:
    """Mean intersection-over-union of integer label maps ``pred`` and ``target`` (same shape), over the
    classes present in the target or the prediction (module docstring: mmseg convention)."""
    return iou_from_confusion(confusion_matrix(pred, target, num_classes, ignore_index))[0]


# ----------------------------------------------------------------------------------------------- probe
@dataclasses.dataclass
class SegResult:
    """Outcome of :func:`fit_segmentation_probe`: test ``miou`` and ``pixel_acc`` in [0, 1],
    ``per_class_iou`` (None = class absent from both test targets and predictions), ``hparams``."""

    miou: float
    pixel_acc: float
    per_class_iou: list
    hparams: dict
    num_train: int
    num_test: int
    num_classes: int
    token_grid: tuple
    mask_size: tuple
    fit_seconds: float

    def metrics(self) -> dict[str, float]:
        """The reported metrics: ``{"miou": ..., "pixel_acc": ...}``."""
        return {"miou": self.miou, "pixel_acc": self.pixel_acc}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _grid(tokens: Array, name: str) -> tuple[int, int, int, int]:
    """(channel axis, D, h, w) of ``(N, T, D)`` tokens (square grid) or ``(N, D, h, w)`` maps."""
    if tokens.ndim == 4:
        return 1, int(tokens.shape[1]), int(tokens.shape[2]), int(tokens.shape[3])
    t = int(tokens.shape[1])
    side = math.isqrt(t)
    if side * side != t:
        raise MetricInputError(f"{name} has {t} tokens per sample, not a square grid; pass (N, D, h, w) maps")
    return 2, int(tokens.shape[2]), side, side


def _tokens(b: torch.Tensor) -> torch.Tensor:
    """A gathered batch ``(B, T, D)`` or ``(B, D, h, w)`` → ``(B, T, D)`` tokens (row-major grid)."""
    return b.flatten(2).transpose(1, 2) if b.ndim == 4 else b


def _gather_masks(m: Array, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    rows = m[idx.to(m.device)] if isinstance(m, torch.Tensor) else torch.from_numpy(np.asarray(m[idx.numpy()]))
    return rows.to(device=device, dtype=torch.int64)


def _check_masks(m: Any, n: int, name: str, num_classes: int, ignore_index: int) -> Array:
    if not isinstance(m, (torch.Tensor, np.ndarray)):
        raise MetricInputError(f"{name} must be a torch.Tensor or numpy array, got {type(m).__name__}")
    integer = (not m.dtype.is_floating_point and m.dtype != torch.bool) if isinstance(m, torch.Tensor) \
        else np.issubdtype(m.dtype, np.integer)
    if not integer:
        raise MetricInputError(f"{name} must hold integer class indices, got dtype {m.dtype}")
    if m.ndim != 3:
        raise MetricInputError(f"{name} must be (N, H, W), got shape {tuple(m.shape)}")
    if m.shape[0] != n:
        raise MetricInputError(f"{name} has {m.shape[0]} masks but its tokens have {n} samples")
    for idx in chunks(n, rows_per_chunk(m)):
        b = _gather_masks(m, idx, torch.device("cpu"))
        bad = ((b < 0) | (b >= num_classes)) & (b != ignore_index)
        if bool(bad.any()):
            raise MetricInputError(f"{name} contains class {int(b[bad][0])}, outside the declared classes "
                                  f"0..{num_classes - 1} and ignore_index={ignore_index}")
    return m


def _linear_upsample_matrix(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """``(n_out, n_in)`` weights of 1-D linear interpolation as ``F.interpolate(mode="linear",
    align_corners=False)`` computes it (obtained by interpolating the identity, so the conventions match)."""
    eye = torch.eye(n_in, device=device)[:, None, :]                                       # (n_in, 1, n_in)
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[:, 0, :].T.contiguous()


def upsample_logits(logits: torch.Tensor, size: tuple) -> torch.Tensor:
    """Bilinear upsampling ``(B, K, h, w)`` → ``(B, K, H, W)``, equal to ``F.interpolate(mode="bilinear",
    align_corners=False)`` (to float rounding) but computed as two small matrix products ``U_h @ x @ U_w^T``:
    on the CPU its backward pass is several times faster than the interpolation kernel's."""
    h, w = logits.shape[-2:]
    u_h = _linear_upsample_matrix(h, int(size[0]), logits.device)
    u_w = u_h if (w, size[1]) == (h, size[0]) else _linear_upsample_matrix(w, int(size[1]), logits.device)
    return u_h @ logits @ u_w.T


class _Head(torch.nn.Module):
    """Optional BatchNorm (no affine, cumulative running statistics, over batch and grid positions) + a linear
    map per patch (a 1x1 convolution): tokens ``(B, T, D)`` on a ``grid = (h, w)`` → logits ``(B, K, h, w)``.
    Works in the token layout: on the CPU a 1x1 convolution's backward pass is several times slower."""

    def __init__(self, dim: int, num_classes: int, batchnorm: bool):
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(dim, affine=False, momentum=None) if batchnorm else torch.nn.Identity()
        self.conv = torch.nn.Linear(dim, num_classes)
        torch.nn.init.zeros_(self.conv.weight)
        torch.nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor, grid: tuple) -> torch.Tensor:
        b, t, d = x.shape
        logits = self.conv(self.bn(x.reshape(b * t, d)))                                  # (B*T, K)
        return logits.reshape(b, *grid, -1).permute(0, 3, 1, 2)


@dataclasses.dataclass(frozen=True)
class SegProbeConfig:
    """How :func:`fit_segmentation_probe` trains (checked when built, :class:`MetricInputError`): ``batchnorm``
    (DINOv2 "lin." BatchNorm without affine), AdamW ``epochs`` (the most run; the cosine schedule spans them),
    ``lr``, ``weight_decay``, ``batch_size``; ``seed`` (held-out split and batch order); early stopping:
    ``floor(val_fraction * N)`` training images held out, the epoch of best held-out mIoU kept, stop after
    ``patience`` epochs without a gain (``val_fraction=0``: all ``epochs`` on every image)."""

    batchnorm: bool = True
    epochs: int = EPOCHS
    lr: float = 2e-2
    weight_decay: float = 1e-4
    batch_size: int = 64
    seed: int = 0
    val_fraction: float = VAL_FRACTION
    patience: int = PATIENCE

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.weight_decay < 0 or self.patience < 1 \
                or not 0 <= self.val_fraction < 1:
            raise MetricInputError(f"need epochs >= 1, batch_size >= 1, lr > 0, weight_decay >= 0, patience >= 1, "
                                  f"val_fraction in [0, 1); got {self.epochs}, {self.batch_size}, {self.lr}, "
                                  f"{self.weight_decay}, {self.patience}, {self.val_fraction}")


def _split(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, held-out) sample indices, ``floor(val_fraction * n)`` random samples held out; no held-out part
    (an empty tensor) when that would be 0 samples or leave none to fit on."""
    n_val = int(math.floor(val_fraction * n))
    if n_val < 1 or n_val >= n:
        return torch.arange(n), torch.zeros(0, dtype=torch.int64)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed) + 1))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


class _Data:
    """Tokens + masks of one split, read in batches as standardised ``(B, T, D)`` tokens and ``(B, H, W)``."""

    def __init__(self, tokens: Array, masks: Array, grid: tuple, mean, std, device: torch.device):
        self.tokens, self.masks, self.grid, self.mean, self.std, self.device = tokens, masks, grid, mean, std, device

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (_tokens(gather(self.tokens, idx, self.device)) - self.mean) / self.std
        return x, _gather_masks(self.masks, idx, self.device)


def _train_epoch(head, opt, sched, data: _Data, idx: torch.Tensor, batch_size: int, ignore_index: int,
                 gen: torch.Generator, batchnorm: bool) -> None:
    head.train()
    perm = idx[torch.randperm(len(idx), generator=gen)]
    for start in range(0, len(perm), batch_size):
        x, y = data.batch(perm[start: start + batch_size].sort().values)
        if batchnorm and x.shape[0] * x.shape[1] == 1:
            continue  # BatchNorm cannot normalise a single value per channel (1x1 grid, last batch of 1)
        logits = upsample_logits(head(x, data.grid), y.shape[-2:])
        loss = F.cross_entropy(logits, y, ignore_index=ignore_index)
        opt.zero_grad(set_to_none=True)
        if torch.isfinite(loss):  # a batch of only ignored pixels gives NaN: nothing to learn from it
            loss.backward()
            opt.step()
        sched.step()


@torch.no_grad()
def _confusion(head, data: _Data, idx: torch.Tensor, num_classes: int, ignore_index: int,
               batch_size: int) -> torch.Tensor:
    """``(K, K)`` confusion matrix of the head's upsampled arg-max on samples ``idx``."""
    head.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=data.device)
    for start in range(0, len(idx), batch_size):
        x, y = data.batch(idx[start: start + batch_size])
        pred = upsample_logits(head(x, data.grid), y.shape[-2:]).argmax(1)
        conf += confusion_matrix(pred, y, num_classes, ignore_index)
    return conf


def _valid_miou(conf: torch.Tensor) -> float:
    """mIoU of a held-out confusion matrix, -1 when it counts no valid pixel."""
    return iou_from_confusion(conf)[0] if int(conf.sum()) else -1.0


def _fit_head(head, data: _Data, fit_idx, val_idx, num_classes: int, ignore_index: int, cfg: SegProbeConfig) -> dict:
    """Train ``head`` (AdamW, cosine over ``epochs``); with held-out samples, keep the epoch of best held-out mIoU
    and stop after ``patience`` epochs without a gain. Returns what was run (epochs, best epoch, held-out mIoU)."""
    epochs, lr, weight_decay, batch_size, patience = cfg.epochs, cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.patience
    batchnorm, seed = cfg.batchnorm, cfg.seed
    opt = torch.optim.AdamW([{"params": [head.conv.weight], "weight_decay": weight_decay},
                             {"params": [head.conv.bias], "weight_decay": 0.0}], lr=lr)
    total = max(1, epochs * math.ceil(len(fit_idx) / batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total)))
    gen = torch.Generator().manual_seed(int(seed))
    best, best_epoch, best_state, run = -math.inf, epochs, None, 0
    for epoch in range(1, epochs + 1):
        _train_epoch(head, opt, sched, data, fit_idx, batch_size, ignore_index, gen, batchnorm)
        run = epoch
        if len(val_idx) == 0:
            continue
        score = _valid_miou(_confusion(head, data, val_idx, num_classes, ignore_index, batch_size))
        if score > best + MIN_GAIN:
            best, best_epoch, best_state = score, epoch, copy.deepcopy(head.state_dict())
        elif epoch - best_epoch >= patience:
            break
    if best_state is not None:
        head.load_state_dict(best_state)
    return {"epochs_run": run, "best_epoch": best_epoch, "val_miou": None if best_state is None else best}


def fit_segmentation_probe(train_tokens: Array, train_masks: Array, test_tokens: Array, test_masks: Array,
                           num_classes: int, ignore_index: int = 255, config: SegProbeConfig | None = None,
                           device: Any = None) -> SegResult:
    """Train a linear segmentation probe and score it on the test split.

    Args:
        train_tokens, test_tokens: ``(N, T, D)`` patch tokens on a square grid (T = h * w, row-major) or
            ``(N, D, h, w)`` feature maps; torch tensors or numpy arrays (memmaps welcome), any float dtype.
        train_masks, test_masks: ``(N, H, W)`` integer class maps (values ``0..num_classes-1`` or
            ``ignore_index``); the logits are bilinearly upsampled from ``(h, w)`` to ``(H, W)``.
        num_classes: number of classes K.
        config: :class:`SegProbeConfig` (BatchNorm, AdamW schedule, seed, early stopping).
        device: None = CUDA when available.

    Raises:
        MetricInputError: empty inputs, NaN / inf tokens, mismatched sample counts or widths, non-integer
            masks, mask classes outside ``0..num_classes-1`` other than ``ignore_index``, non-square grids.
    """
    cfg = config or SegProbeConfig()
    num_classes = check_num_classes(num_classes)
    train_tokens = check_features(train_tokens, "train_tokens", (3, 4))
    test_tokens = check_features(test_tokens, "test_tokens", (3, 4))
    ch, dim, h, w = _grid(train_tokens, "train_tokens")
    _, dim_t, h_t, w_t = _grid(test_tokens, "test_tokens")
    if dim_t != dim:
        raise MetricInputError(f"train_tokens have {dim} channels but test_tokens have {dim_t}")
    n, m = int(train_tokens.shape[0]), int(test_tokens.shape[0])
    _check_masks(train_masks, n, "train_masks", num_classes, ignore_index)
    _check_masks(test_masks, m, "test_masks", num_classes, ignore_index)

    t0 = time.perf_counter()
    dev = resolve_device(device)
    mean, std = channel_stats(train_tokens, "train_tokens", ch, dev)
    check_finite(test_tokens, "test_tokens", dev)
    train = _Data(train_tokens, train_masks, (h, w), mean, std, dev)
    test = _Data(test_tokens, test_masks, (h_t, w_t), mean, std, dev)
    head = _Head(dim, num_classes, cfg.batchnorm).to(dev)
    fit_idx, val_idx = _split(n, cfg.val_fraction, cfg.seed)
    stopping = _fit_head(head, train, fit_idx, val_idx, num_classes, ignore_index, cfg)
    conf = _confusion(head, test, torch.arange(m), num_classes, ignore_index, cfg.batch_size)
    score, acc, per_class = iou_from_confusion(conf)
    hparams = {"epochs": cfg.epochs, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "batch_size": cfg.batch_size,
               "batchnorm": cfg.batchnorm, "optimizer": "AdamW", "upsample": "bilinear",
               "val_fraction": cfg.val_fraction, "patience": cfg.patience, "num_fit": len(fit_idx), **stopping}
    return SegResult(miou=score, pixel_acc=acc, per_class_iou=per_class, hparams=hparams, num_train=n, num_test=m,
                     num_classes=num_classes, token_grid=(h, w), mask_size=tuple(int(s) for s in test_masks.shape[1:]),
                     fit_seconds=time.perf_counter() - t0)
