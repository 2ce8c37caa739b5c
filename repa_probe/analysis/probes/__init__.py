"""Probes on frozen features: linear classification (top-1 / top-5) and linear segmentation (mIoU).

- :func:`fit_linear_probe` — ``(N, D)`` features + labels → :class:`ProbeResult` (sklearn or torch backend).
- :func:`fit_segmentation_probe` — ``(N, T, D)`` or ``(N, D, h, w)`` tokens + ``(N, H, W)`` masks → :class:`SegResult`.
- :func:`miou`, :func:`confusion_matrix`, :func:`iou_from_confusion` — the segmentation metric.
- :class:`VOCSegmentation`, :class:`ADE20KSegmentation` — segmentation datasets from local folders.

Running probes on checkpoints (features, datasets, CSV/JSON/figures) lives in :mod:`repa_probe.analysis.probing`.
"""
from repa_probe.analysis.probes.common import ProbeInputError
from repa_probe.analysis.probes.datasets import ADE20KSegmentation, VOCSegmentation, crop_image_and_mask
from repa_probe.analysis.probes.linear import BACKENDS, ProbeResult, fit_linear_probe, stratified_holdout
from repa_probe.analysis.probes.segmentation import SegResult, confusion_matrix, fit_segmentation_probe, iou_from_confusion, miou

__all__ = [
    "ProbeInputError", "ProbeResult", "fit_linear_probe", "stratified_holdout", "BACKENDS",
    "SegResult", "fit_segmentation_probe", "miou", "confusion_matrix", "iou_from_confusion",
    "VOCSegmentation", "ADE20KSegmentation", "crop_image_and_mask",
]
